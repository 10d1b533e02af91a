"""Study ``lipsformer_no_warmup``: a ViT vs the same sizes with LipsFormer's parts (scaled cosine
attention, CenterNorm, weighted residual, spectral init), each trained with and without learning-
rate warm-up at the same high learning rate (Qi et al., "LipsFormer", 2023;
``shared/specs/lipsformer.md``).

Claim: without warm-up the baseline is unstable or worse, LipsFormer trains stably.  Measures:
per-step loss curves (``steps.jsonl`` of the engine), loss spikes, divergence, final top-1 and the
per-block Lipschitz upper bound (instrument ``lipschitz``).
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Any, Dict, List, Optional

from vitlab.studies.common import Context, load_trained, study_data, train_variant
from vitlab.studies.report import accuracy_tolerance, all_hold, better, not_worse, plot_curves, verdict

NAME = "lipsformer_no_warmup"
TITLE = "LipsFormer trains without learning-rate warm-up"
PAPER = "Qi et al., 2023"
COST = ("about 5 min on 2 idle CPU cores: a 6-block ViT and its LipsFormer twin (width 64), each trained 2 epochs on "
        "3,000 CIFAR-10 images with and without warm-up; --quick: under a minute")
BASE = "vit_tiny_patch4_32"
ARCHS = {"vit": {}, "lipsformer": {"mixer": "cosine", "mixer_kwargs": dict(tau=10.0, normalize_v=True, eps=1e-6),
                                   "norm": "center", "shortcut": "weighted", "init": "spectral"}}
ORDER = ("vit_warmup", "vit_no_warmup", "lipsformer_warmup", "lipsformer_no_warmup")
NUMBER_KEYS = ("top1", "diverged", "loss_spikes", "first_epoch_loss", "final_loss", "log10_lipschitz_bound",
               "train_seconds")
SPIKE_WINDOW, SPIKE_FACTOR = 10, 1.3  # a step whose loss exceeds 1.3 x the median of the 10 before it


def settings(ctx: Context) -> Dict[str, Any]:
    if ctx.quick:
        return dict(model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0), per_class_train=4,
                    per_class_val=2, warmup_epochs=0.5,
                    train=dict(epochs=ctx.budget(1), batch_size=8, lr=5e-3, max_steps=3))
    return dict(model_kwargs=dict(depth=6, embed_dim=64, num_heads=2, mlp_ratio=2.0), per_class_train=300,
                per_class_val=100, warmup_epochs=0.5,
                train=dict(epochs=ctx.budget(2), batch_size=64, lr=5e-3, weight_decay=0.05))


def loss_spikes(losses: List[float], window: int = SPIKE_WINDOW, factor: float = SPIKE_FACTOR) -> int:
    """Steps whose loss exceeds ``factor`` times the median of the ``window`` steps before it, plus
    every non-finite loss."""
    n = 0
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            n += 1
        elif i >= window and v > factor * statistics.median(losses[i - window:i]):
            n += 1
    return n


def _block_bounds(factors: List[Dict[str, Any]]) -> Dict[str, float]:
    """log10 of the bound of each block (the product of its halves' bounds)."""
    out: Dict[str, float] = {}
    for f in factors:
        name = f["name"]
        if name.startswith("blocks.") and "half)" in name:
            blk = name.split(" ")[0]
            b = f["bound"]
            add = math.inf if not math.isfinite(b) else math.log10(max(b, 1e-300))
            out[blk] = out.get(blk, 0.0) + add
    return out


def measure(run_: Dict[str, Any], steps_per_epoch: int) -> Dict[str, Any]:
    from vitlab.analysis.lipschitz import lipschitz_bound_report

    losses = run_["loss"]
    first = losses[:steps_per_epoch]
    nums: Dict[str, Any] = {"top1": run_["summary"].get("top1"), "diverged": bool(run_["diverged"]),
                            "loss_spikes": loss_spikes(losses), "train_seconds": run_["wall_seconds"],
                            "first_epoch_loss": sum(first) / len(first) if first else None,
                            "final_loss": sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]) if losses else None}
    blocks: Dict[str, float] = {}
    im = load_trained(run_)
    if im is not None:
        rep = lipschitz_bound_report(im.model)
        nums["log10_lipschitz_bound"] = rep["log10_bound"]
        blocks = _block_bounds(rep["factors"])
    return {"numbers": nums, "block_bounds": blocks}


def _stable(nums: Dict[str, Any], ref: Dict[str, Any], tol: float) -> Optional[bool]:
    if nums.get("diverged"):
        return False
    vals = {"a": nums.get("top1"), "b": ref.get("top1")}
    return all_hold([not_worse(vals, "a", "b", tol),
                     None if nums.get("loss_spikes") is None else nums["loss_spikes"] <= ref.get("loss_spikes", 0)])


def verdicts(numbers: Dict[str, Dict[str, Any]], n_val: int) -> List[Dict[str, Any]]:
    """The verdict rows from the per-run numbers (pure: tested on synthetic numbers)."""
    def col(key):
        return {m: numbers.get(m, {}).get(key) for m in ORDER}

    top1 = col("top1")
    tol = accuracy_tolerance(top1.get("vit_warmup"), n_val)
    vit_ok = _stable(numbers.get("vit_no_warmup", {}), numbers.get("vit_warmup", {}), tol)
    lips_ok = _stable(numbers.get("lipsformer_no_warmup", {}), numbers.get("lipsformer_warmup", {}), tol)
    bounds = col("log10_lipschitz_bound")
    finite_bound = None
    if bounds.get("lipsformer_no_warmup") is not None and bounds.get("vit_no_warmup") is not None:
        finite_bound = math.isfinite(bounds["lipsformer_no_warmup"]) and not math.isfinite(bounds["vit_no_warmup"])
    spikes = col("loss_spikes")
    return [
        verdict("Without warm-up the baseline ViT is unstable or worse",
                "top-1 (%) vs its warm-up run; divergence and loss spikes in the numbers", top1,
                None if vit_ok is None else not vit_ok,
                f"vit_no_warmup diverges, has more spikes, or top-1 < vit_warmup - {tol:.2f}"),
        verdict("LipsFormer trains stably without warm-up",
                "top-1 (%) vs its warm-up run; divergence and loss spikes in the numbers",
                top1, lips_ok, f"no divergence, spikes <= warm-up run's, top-1 >= lipsformer_warmup - {tol:.2f}"),
        verdict("Without warm-up LipsFormer ends ahead of the baseline", "top-1 (%)", top1,
                better(top1, "lipsformer_no_warmup", "vit_no_warmup"), "lipsformer_no_warmup > vit_no_warmup"),
        verdict("Without warm-up LipsFormer has fewer loss spikes", f"steps with loss > {SPIKE_FACTOR} x median of "
                f"the {SPIKE_WINDOW} before", spikes, better(spikes, "lipsformer_no_warmup", "vit_no_warmup",
                                                             higher=False), "lipsformer_no_warmup < vit_no_warmup"),
        verdict("LipsFormer is Lipschitz (finite bound), the baseline is not", "log10 of the upper bound", bounds,
                finite_bound, "lipsformer finite and vit infinite"),
    ]


def _smooth(xs: List[float], k: int = 5) -> List[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def _figures(ctx: Context, losses: Dict[str, List[float]], lrs: Dict[str, List[float]],
             blocks: Dict[str, Dict[str, float]]) -> List:
    plot_curves([{"title": "training loss (5-step mean)", "ylabel": "loss", "xlabel": "step",
                  "curves": {m: _smooth(v) for m, v in losses.items()}},
                 {"title": "learning rate", "ylabel": "lr", "xlabel": "step", "curves": lrs}],
                os.path.join(ctx.out, "loss_curves.png"), title="Training with and without warm-up at the same high lr")
    plot_curves([{"title": "per-block Lipschitz upper bound", "ylabel": "log10 bound (inf not drawn)",
                  "curves": {m: list(b.values()) for m, b in blocks.items()}}],
                os.path.join(ctx.out, "lipschitz_blocks.png"))
    return [("loss_curves.png", "Per-step training loss and learning rate of the four runs"),
            ("lipschitz_blocks.png", "log10 of each block's Lipschitz upper bound (the baseline's are infinite: "
                                     "dot-product attention and LayerNorm have no global constant)")]


def run(ctx: Context) -> Dict[str, Any]:
    s = settings(ctx)
    data = study_data(ctx, s["per_class_train"], s["per_class_val"])
    spe = max(1, data["train_images"] // s["train"]["batch_size"])
    numbers, losses, lrs, blocks, runs = {}, {}, {}, {}, {}
    for arch, parts in ARCHS.items():
        for warm in (True, False):
            label = f"{arch}_{'warmup' if warm else 'no_warmup'}"
            tr = dict(s["train"], warmup_epochs=s["warmup_epochs"] if warm else 0.0)
            run_ = train_variant(ctx, label, BASE, dict(s["model_kwargs"], **parts), data, **tr)
            runs[label] = {k: run_[k] for k in ("summary", "diverged", "wall_seconds", "model_kwargs")}
            m = measure(run_, spe)
            numbers[label], losses[label], lrs[label], blocks[label] = m["numbers"], run_["loss"], run_["lr"], \
                m["block_bounds"]
    notes = [f"Base {BASE} with {s['model_kwargs']}; LipsFormer parts {ARCHS['lipsformer']} (the paper's cosine "
             f"attention with normalised V and eps, so that the bound is finite); the same recipe {s['train']} for "
             f"all four runs, warm-up {s['warmup_epochs']} epoch(s) linear from 1e-6 or none.",
             "The engine's step log records the loss, not the gradient norm, so loss spikes stand in for the "
             "paper's gradient-norm spikes."]
    return {"settings": s, "data": data, "models_order": list(ORDER), "numbers": numbers, "number_keys": NUMBER_KEYS,
            "losses": losses, "lr": lrs, "block_bounds": blocks, "runs": runs, "notes": notes,
            "figures": _figures(ctx, losses, lrs, blocks), "verdicts": verdicts(numbers, data["val_images"])}
