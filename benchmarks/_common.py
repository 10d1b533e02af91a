"""Shared helpers of the benchmark scripts: machine description, tables, RESULTS.md sections."""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing

from vitlab.bench import AMP_DTYPES, BenchResult, format_bytes, matmul_rate  # noqa: E402
from vitlab.runtime import tune_cpu_allocator  # noqa: E402


def common_args(description: str, batch_size: int = 16, runs: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per step (default {batch_size})")
    p.add_argument("--runs", type=int, default=runs, help=f"timed steps per model, alternating (default {runs})")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    p.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="autocast dtype (default float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    return p


def vit_args(description: str) -> argparse.ArgumentParser:
    """:func:`common_args` plus the ViT-S scripts' ``--img-size``, ``--infer-only``, ``--train-only``."""
    p = common_args(description)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--infer-only", action="store_true")
    p.add_argument("--train-only", action="store_true")
    return p


def setup(args) -> None:
    """Threads, seed, and the C allocator setting of ``vitlab train`` / ``vitlab bench``
    (:func:`vitlab.runtime.tune_cpu_allocator`): process-wide, so every model of the run gets it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.malloc_tuned = tune_cpu_allocator()
    torch.manual_seed(0)


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or "cpu"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        dev = f"{cpu}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}"
    import timm

    try:
        import vit_pytorch
        vp = getattr(vit_pytorch, "__version__", None)
        if vp is None:
            from importlib.metadata import version
            vp = version("vit-pytorch")
    except ImportError:
        vp = "not installed"
    return (f"{dev}; Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"vit-pytorch {vp}")


def mm_rate(args, n: int = 2048) -> float:
    return matmul_rate(args.device, AMP_DTYPES[args.amp] or torch.float32, n=n, runs=5)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_result(r: BenchResult, mm: Optional[float] = None) -> List[str]:
    """img/s, ms/step (median [min-max]), GFLOPs/img, GFLOP/s, roofline %, peak memory, params."""
    fl = r.flops_per_s
    return [f"{r.img_per_s:.2f}",
            f"{r.median_s * 1e3:.0f} [{min(r.times_s) * 1e3:.0f}-{max(r.times_s) * 1e3:.0f}]",
            f"{r.flops_per_image / 1e9:.2f}" if r.flops_per_image else "n/a",
            f"{fl / 1e9:.1f}" if fl else "n/a",
            f"{100 * fl / mm:.0f}%" if (fl and mm) else "n/a",
            format_bytes(r.peak_mem_bytes),
            f"{r.params / 1e6:.2f}"]


RESULT_HEADERS = ["img/s", "ms/step median [min-max]", "GFLOPs/img", "GFLOP/s", "of mm rate", "peak step mem", "params (M)"]


def paired(a: BenchResult, b: BenchResult) -> str:
    """Throughput ratio a / b from the rounds: median over rounds of t_b / t_a (each round times a and
    b back to back, so a load change within the run cancels), and in how many rounds a was faster."""
    r = [tb / ta for ta, tb in zip(a.times_s, b.times_s)]
    wins = sum(x > 1 for x in r)
    return f"paired per round {statistics.median(r):.2f}x, faster in {wins}/{len(r)} rounds"


def paired_growth(a: BenchResult, b: BenchResult) -> float:
    """Median over rounds of t_a / t_b (how many times longer a's step took than b's, same round)."""
    return statistics.median(ta / tb for ta, tb in zip(a.times_s, b.times_s))


def update_results(section: str, title: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- begin:section -->`` and ``<!-- end:section -->``."""
    begin, end = f"<!-- begin:{section} -->", f"<!-- end:{section} -->"
    block = f"{begin}\n## {title}\n\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# vitlab benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    print(f"updated section '{section}' of {RESULTS}")


def publish(args, section: str, title: str, body: str) -> None:
    """Print ``body`` and, unless ``--no-write``, write it as ``section`` (plus the settings suffix,
    e.g. ``_cuda_bf16_compile``) of RESULTS.md under ``title``."""
    print(body)
    if not args.no_write:
        update_results(section + suffix(args), title, body)


def header(args, command: str, started: str, load_before: str) -> str:
    return (f"Command: `{command}`  \n"
            f"Run: {started}; machine: {machine(args.device)}  \n"
            f"Load average (1, 5, 15 min) before: {load_before}; after: {loadavg()}  \n"
            f"Settings: batch {args.batch_size}, {args.amp if args.amp != 'none' else 'float32'}, "
            f"{'torch.compile, ' if args.compile else ''}device {args.device}, {args.runs} timed steps per model "
            f"after {args.warmup} warm-up steps, models alternating step by step (order reversed every other "
            f"round); medians; C allocator "
            f"{'tuned by vitlab.runtime for all models (no mmap, no heap trimming)' if getattr(args, 'malloc_tuned', False) else 'at its defaults'}; "
            "training steps use torch's AdamW with its fused kernel (as `vitlab train`), the same for every model.\n")


def suffix(args) -> str:
    """Section-name suffix for non-default settings, e.g. '_cuda_bf16_compile' ('' for CPU float32)."""
    parts = [args.device.split(":")[0]] if args.device != "cpu" else []
    parts += [args.amp] if args.amp != "none" else []
    parts += ["compile"] if args.compile else []
    return "".join("_" + p for p in parts)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent)] + sys.argv[1:])


def vs_timm(args, pairs: dict, section: str, title: str, img_size=None) -> int:
    """Benchmark each ``vitlab name -> timm name`` of ``pairs`` (vitlab and timm steps alternating, one pair
    at a time), print the ratios and publish one RESULTS.md section.  A name vitlab has not registered is
    listed as not run.  ``img_size`` (optional) builds both models at that size."""
    import timm

    import vitlab
    from vitlab.bench import MM_KEY, StepSpec, compare

    started, load0 = now(), loadavg()
    print(f"load average: {load0}")
    rows, missing, ratios = [], [], []
    for name, timm_name in pairs.items():
        if not vitlab.is_model(name):
            missing.append(name)
            print(f"{name}: not registered in vitlab yet, skipped")
            continue
        torch.manual_seed(0)
        kw = {"img_size": img_size} if img_size else {}
        models = {f"vitlab {name}": vitlab.create_model(name, **kw),
                  f"timm {timm_name}": timm.create_model(timm_name, **kw)}
        size = tuple(models[f"vitlab {name}"].default_cfg["input_size"])
        size = (size[0], img_size, img_size) if img_size else size
        spec = StepSpec(batch_size=args.batch_size, input_size=size, train=args.train, device=args.device,
                        amp=args.amp, compile=args.compile)
        res = compare(models, spec, runs=args.runs, warmup=args.warmup, mm_size=2048)
        mm = res.pop(MM_KEY).flops_per_s
        rows += [[k] + fmt_result(r, mm) for k, r in res.items()]
        a, b = res.values()
        ratios.append(f"{name}: vitlab / timm **{a.img_per_s / b.img_per_s:.2f}x** ({paired(a, b)}) "
                      f"(torch.mm rate in these rounds {mm / 1e9:.1f} GFLOP/s)")
        print(ratios[-1], flush=True)
    body = header(args, command_line(), started, load0) + "\n"
    if rows:
        body += table(["model"] + RESULT_HEADERS, rows) + "\n\nRatios: " + "; ".join(ratios) + ".\n"
    if missing:
        body += f"\nNot run: {', '.join(missing)} (not registered in vitlab when this ran).\n"
    publish(args, section + ("_train" if args.train else ""), f"{title} ({'training' if args.train else 'inference'})",
            body)
    return 0
