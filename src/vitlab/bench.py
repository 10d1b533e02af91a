"""``vitlab bench``: images per second, peak memory, parameters, FLOPs and achieved FLOP/s.

Timing: the median of ``runs`` timed steps after ``warmup`` untimed ones, synchronising the
device around every step on GPU.  A step is a forward pass (inference, under
``torch.inference_mode``) or a training step (forward, cross-entropy, backward, AdamW step).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; elementwise ops are not counted), for one image, forward only or forward + backward.
Peak memory is the high-water mark of bytes allocated *during* one step above what was live
when it started (activations, temporaries, gradients): from the CUDA caching allocator on GPU,
from the profiler's allocation events on CPU.

The same functions time models of any library (timm, vit-pytorch): :func:`compare` runs
several of them *alternating*, one step each in turn, so that machine load hits all alike;
the scripts in ``benchmarks/`` are built on it.  :func:`matmul_rate` measures the FLOP/s of a
large ``torch.mm`` for a roofline line (achieved model FLOP/s over matmul FLOP/s).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["BenchResult", "StepSpec", "add_arguments", "run", "count_flops", "make_step", "time_steps",
           "peak_step_memory", "matmul_rate", "benchmark", "compare", "format_bytes", "MM_KEY"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchResult:
    """One measured configuration.  ``times_s`` are the timed steps (seconds per batch)."""

    name: str
    mode: str  # "infer" | "train"
    device: str
    batch_size: int
    input_size: Tuple[int, int, int]
    amp: str
    params: int
    flops_per_image: Optional[int]  # forward (infer) or forward + backward (train)
    peak_mem_bytes: Optional[int]
    times_s: List[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def img_per_s(self) -> float:
        return self.batch_size / self.median_s

    @property
    def flops_per_s(self) -> Optional[float]:
        if self.flops_per_image is None:
            return None
        return self.flops_per_image * self.batch_size / self.median_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median_s, img_per_s=self.img_per_s, flops_per_s=self.flops_per_s)
        return d


@dataclass
class StepSpec:
    """How a step is run: mode, batch, input size, device, autocast dtype, compile, memory format."""

    batch_size: int = 16
    input_size: Tuple[int, int, int] = (3, 224, 224)
    train: bool = False
    device: str = "cpu"
    amp: str = "none"
    compile: bool = False
    channels_last: bool = False
    num_classes: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if len(self.input_size) != 3 or any(int(s) < 1 for s in self.input_size):
            raise ValueError(f"input size must be (C, H, W) with positive entries, got {self.input_size!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but no CUDA device is available; use --device cpu")

    @property
    def mode(self) -> str:
        return "train" if self.train else "infer"


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _infer_num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 1


def _autocast(spec: StepSpec):
    dtype = AMP_DTYPES[spec.amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=spec.device.split(":")[0], dtype=dtype)


def make_step(model: nn.Module, spec: StepSpec, seed: int = 0) -> Callable[[], None]:
    """Move ``model`` to the device and return a zero-argument function running one step on a
    fixed random batch: inference (``inference_mode``, ``eval()``) or a training step
    (``train()``, cross-entropy on random labels, backward, ``torch.optim.AdamW`` step, fused as in
    ``vitlab train`` where the device has the kernel; the same for every model compared)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.batch_size, *spec.input_size, generator=g)
    model = model.to(spec.device)
    x = x.to(spec.device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train(spec.train)
    fwd = torch.compile(model) if spec.compile else model
    if not spec.train:
        def infer() -> None:
            with torch.inference_mode(), _autocast(spec):
                fwd(x)
        return infer
    num_classes = spec.num_classes or _infer_num_classes(model)
    y = torch.randint(0, num_classes, (spec.batch_size,), generator=g).to(spec.device)
    from vitlab.engine.optim import fused_ok

    # tiny lr: weights stay sane over many steps; fused kernel where torch has one, as `vitlab train`
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused_ok(model) or None)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        with _autocast(spec):
            loss = loss_fn(fwd(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train_step


def time_steps(step: Callable[[], None], runs: int = 5, warmup: int = 1, device: str = "cpu") -> List[float]:
    """Seconds per call of ``step`` over ``runs`` timed calls after ``warmup`` untimed ones."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler back-end's start/stop lines, written to file descriptor 2 from C++."""
    import os
    import sys

    fd = 2
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (ValueError, OSError):  # no file descriptor 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_from_profiler(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


def peak_step_memory(step: Callable[[], None], device: str = "cpu") -> int:
    """High-water mark of bytes allocated while ``step()`` runs, above what was live before it.
    Run the step at least once before (warm-up) so that lazily created state (optimizer moments)
    is not counted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_from_profiler(step)


def _flops_or_none(key: str, model: nn.Module, spec: "StepSpec") -> Optional[int]:
    """:func:`count_flops`, or None (said on stderr) where the counter cannot follow the model (timm's PiT)."""
    try:
        return count_flops(model, spec.input_size, spec.train, spec.device)
    except (AssertionError, RuntimeError) as exc:
        print(f"{key}: FLOPs not counted ({type(exc).__name__}: {str(exc).splitlines()[0]})", file=sys.stderr)
        return None


def count_flops(model: nn.Module, input_size: Tuple[int, int, int], train: bool = False,
                device: str = "cpu") -> int:
    """FLOPs (not MACs) for one image: forward, or forward + backward when ``train``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` with the math SDPA backend (its
    matmuls are counted; the fused CPU kernel is unknown to the counter).  Model mode and
    gradients are restored afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *input_size, device=device)
    was_training = model.training
    model.train(train)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            if train:
                with torch.enable_grad():
                    model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
        if train:
            model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, runs: int = 5,
                warmup: int = 1) -> float:
    """FLOP/s of ``torch.mm`` on two ``n x n`` matrices (2 n^3 FLOPs), median of ``runs``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    times = time_steps(lambda: torch.mm(a, b), runs=runs, warmup=warmup, device=device)
    return 2.0 * n ** 3 / statistics.median(times)


def benchmark(model: nn.Module, spec: StepSpec, name: str = "", runs: int = 5, warmup: int = 1,
              flops: bool = True, memory: bool = True) -> BenchResult:
    """Measure one model (any ``nn.Module`` taking ``(B, C, H, W)``) under ``spec``."""
    return compare({name or type(model).__name__: model}, spec, runs=runs, warmup=warmup, flops=flops,
                   memory=memory)[name or type(model).__name__]


MM_KEY = "torch.mm"


def compare(models: Dict[str, nn.Module], spec: StepSpec, runs: int = 5, warmup: int = 1, flops: bool = True,
            memory: bool = True, specs: Optional[Dict[str, StepSpec]] = None,
            mm_size: Optional[int] = None) -> Dict[str, BenchResult]:
    """Measure several models in one run, *alternating*: each timed round runs one step of every model in turn
    (reversed every other round), so load changes affect all alike and no model always follows the same one.
    ``specs`` may give a model its own step spec (e.g. a different input size); ``spec`` is the default.

    With ``mm_size=n`` a ``torch.mm`` of two ``n x n`` matrices (in the autocast dtype) takes part
    in the rounds too, as the result ``"torch.mm"`` (batch 1, ``2 n^3`` FLOPs): the roofline
    reference measured under the same load."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    specs = {k: (specs or {}).get(k, spec) for k in models}
    results: Dict[str, BenchResult] = {}
    steps: Dict[str, Callable[[], None]] = {}
    if mm_size:
        g = torch.Generator().manual_seed(0)
        dtype = AMP_DTYPES[spec.amp] or torch.float32
        a, b = (torch.randn(mm_size, mm_size, generator=g).to(spec.device, dtype) for _ in range(2))
        steps[MM_KEY] = lambda: torch.mm(a, b)
        specs[MM_KEY] = spec
        results[MM_KEY] = BenchResult(MM_KEY, "mm", spec.device, 1, (1, mm_size, mm_size), spec.amp, 0,
                                      2 * mm_size ** 3, None)
    for key, model in models.items():
        s = specs[key]
        model = model.to(s.device)
        f = _flops_or_none(key, model, s) if flops else None
        steps[key] = make_step(model, s)
        results[key] = BenchResult(key, s.mode, s.device, s.batch_size, tuple(s.input_size), s.amp,
                                   sum(p.numel() for p in model.parameters()), f, None)
    for key, step in steps.items():  # warm-up (and compile) every model first
        for _ in range(warmup):
            step()
        _sync(specs[key].device)
        if memory and key != MM_KEY:
            results[key].peak_mem_bytes = peak_step_memory(step, specs[key].device)
    for r in range(runs):
        for key, step in (list(steps.items()) if r % 2 == 0 else list(steps.items())[::-1]):
            results[key].times_s.extend(time_steps(step, runs=1, warmup=0, device=specs[key].device))
    return results


# -- the command line ------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registered model name (see `vitlab models`)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's default_cfg)")
    p.add_argument("--train", action="store_true", help="time a training step (fwd, bwd, AdamW) instead of inference")
    p.add_argument("--amp", default="auto", choices=["auto", *AMP_DTYPES],
                   help="autocast dtype: auto (default; bf16 on a CPU with native bf16 for a model >= 192 wide, as "
                        "`vitlab train`, else float32), none (float32), bf16, fp16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and input")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--runs", type=int, default=5, help="timed steps; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the torch.mm FLOP/s rate")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from vitlab.models.factory import create_model

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive integer, got {args.img_size}")
    if args.runs < 1 or args.warmup < 0:
        raise ValueError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    StepSpec(batch_size=args.batch_size, device=args.device)  # bad values fail before building
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    model = create_model(args.model, **overrides)
    from vitlab.engine.amp import resolve_amp
    amp = resolve_amp(args.amp, torch.device(args.device.split(":")[0]), model)
    c, h, w = model.default_cfg["input_size"]
    spec = StepSpec(batch_size=args.batch_size, input_size=(c, h, w), train=args.train, device=args.device,
                    amp=amp, compile=args.compile, channels_last=args.channels_last)
    both = compare({args.model: model}, spec, runs=args.runs, warmup=args.warmup,
                   mm_size=None if args.no_roofline else 2048)
    res = both[args.model]
    mm = both[MM_KEY].flops_per_s if MM_KEY in both else None
    out = res.as_dict()
    out.update(matmul_flops_per_s=mm, roofline=(res.flops_per_s / mm) if mm and res.flops_per_s else None,
               threads=torch.get_num_threads(), torch=torch.__version__, amp_requested=args.amp)
    if args.json:
        print(json.dumps(out))
        return 0
    flops = res.flops_per_image
    what = "fwd+bwd" if args.train else "fwd"
    amp_note = f"amp {spec.amp}{' (auto)' if args.amp == 'auto' else ''}"
    print(f"model            {args.model} ({spec.mode}, batch {spec.batch_size}, {c}x{h}x{w}, {spec.device}, "
          f"{amp_note}{', compiled' if spec.compile else ''}{', channels-last' if spec.channels_last else ''}, "
          f"{torch.get_num_threads()} threads)")
    print(f"throughput       {res.img_per_s:.2f} img/s  (median {res.median_s * 1e3:.1f} ms/step over "
          f"{len(res.times_s)} runs; min {min(res.times_s) * 1e3:.1f}, max {max(res.times_s) * 1e3:.1f})")
    print(f"peak memory      {format_bytes(res.peak_mem_bytes)} allocated during a step (above weights)")
    print(f"parameters       {res.params / 1e6:.2f} M")
    print(f"FLOPs per image  {flops / 1e9:.3f} GFLOPs ({what})")
    print(f"achieved         {res.flops_per_s / 1e9:.1f} GFLOP/s")
    if mm:
        print(f"torch.mm rate    {mm / 1e9:.1f} GFLOP/s (2048x2048, timed alternating with the model) -> roofline {100 * out['roofline']:.0f}%")
    return 0
