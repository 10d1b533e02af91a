"""Study ``focused_linear``: the same small ViT with softmax attention, plain linear attention,
focused linear attention and its two ablations (focusing factor 1; no depthwise conv) (Han et al.,
"FLatten Transformer", ICCV 2023; ``shared/specs/flatten.md``).

Claim: focused linear attention recovers softmax's accuracy and rank at linear cost; plain linear
attention is low-rank and less accurate.  Measures: top-1, attention entropy (focus), the rank of
the N x N attention matrix (``record_attention``; for linear attention the implied row-normalised
phi(Q)phi(K)^T, and with the DWC term added as a banded matrix as in the paper's rank figure), and
time and peak memory of a forward pass against the number of tokens (``vitlab bench``'s step).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from vitlab.studies.common import Context, analysis_data, load_trained, study_data, train_variant
from vitlab.studies.flatten_measures import cost_vs_tokens, dwc_off, rank_and_entropy
from vitlab.studies.report import accuracy_tolerance, all_hold, better, not_worse, plot_curves, verdict

NAME = "focused_linear"
TITLE = "Focused linear attention vs softmax and plain linear attention"
PAPER = "Han et al., ICCV 2023"
COST = ("about 10 min on 2 idle CPU cores: five 6-block ViTs (width 64) trained 2 epochs on 3,000 CIFAR-10 images, "
        "rank/entropy on 8 images, forward time and memory at 4 token counts; --quick: under a minute")
BASE = "vit_tiny_patch4_32"
ORDER = ("softmax", "linear", "focused", "focused_p1", "focused_nodwc")
NUMBER_KEYS = ("top1", "rank", "rank_dwc", "rank_fraction", "entropy_norm", "time_slope", "memory_slope",
               "train_seconds")


def variants(off: Dict[str, Any]) -> Dict[str, Tuple[Dict[str, Any], bool]]:
    """label -> (model arguments, has a spatial DWC term); ``off`` switches the DWC off."""
    lin = "focused_linear"
    return {"softmax": ({}, False),
            "linear": ({"mixer": lin, "mixer_kwargs": dict(focusing_factor=1.0, **off)}, False),
            "focused": ({"mixer": lin, "mixer_kwargs": dict(focusing_factor=3.0, kernel_size=5)}, True),
            "focused_p1": ({"mixer": lin, "mixer_kwargs": dict(focusing_factor=1.0, kernel_size=5)}, True),
            "focused_nodwc": ({"mixer": lin, "mixer_kwargs": dict(focusing_factor=3.0, **off)}, False)}


def settings(ctx: Context) -> Dict[str, Any]:
    if ctx.quick:
        return dict(model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0), per_class_train=4,
                    per_class_val=2, train=dict(epochs=ctx.budget(1), batch_size=8, lr=1e-3, warmup_epochs=0.0,
                                                max_steps=2), rank_images=2, sizes=[16, 32], cost_batch=1,
                    cost_runs=1)
    return dict(model_kwargs=dict(depth=6, embed_dim=64, num_heads=2, mlp_ratio=2.0), per_class_train=300,
                per_class_val=100, train=dict(epochs=ctx.budget(2), batch_size=64, lr=1e-3, warmup_epochs=0.5,
                                              weight_decay=0.05), rank_images=8, sizes=[32, 64, 128, 192],
                cost_batch=2, cost_runs=3)


def verdicts(numbers: Dict[str, Dict[str, Any]], n_val: int, head_dim: int) -> List[Dict[str, Any]]:
    """The verdict rows from the per-model numbers (pure: tested on synthetic numbers)."""
    def col(key):
        return {m: numbers.get(m, {}).get(key) for m in ORDER}

    top1, tol = col("top1"), accuracy_tolerance(col("top1").get("softmax"), n_val)
    rank, rank_dwc = col("rank"), col("rank_dwc")
    low_rank = all_hold([better(rank, "linear", "softmax", higher=False),
                         None if rank.get("linear") is None else rank["linear"] <= head_dim + 1e-9])
    ts, ms = col("time_slope"), col("memory_slope")
    linear_cost = all_hold([better(ts, "focused", "softmax", higher=False),
                            None if ts.get("focused") is None else ts["focused"] < 1.5])
    return [
        verdict("Focused linear attention recovers softmax's accuracy", "top-1 (%)", top1,
                not_worse(top1, "focused", "softmax", tol), f"focused >= softmax - {tol:.2f} (2 s.e., {n_val} images)"),
        verdict("Plain linear attention is less accurate than focused linear", "top-1 (%)", top1,
                better(top1, "focused", "linear"), "focused > linear"),
        verdict("Plain linear attention is low-rank", "mean rank of the N x N attention matrix", rank, low_rank,
                f"linear < softmax and linear <= head dim {head_dim}"),
        verdict("Focused linear attention (with its DWC) recovers softmax's rank",
                "mean rank, DWC term included", rank_dwc,
                None if not (rank_dwc.get("focused") and rank_dwc.get("softmax")) else
                rank_dwc["focused"] >= 0.95 * rank_dwc["softmax"], "focused >= 0.95 x softmax"),
        verdict("The focusing function sharpens linear attention", "attention entropy / log N", col("entropy_norm"),
                better(col("entropy_norm"), "focused", "linear", higher=False), "focused < linear"),
        verdict("Ablation: focusing factor 3 beats 1", "top-1 (%)", top1, better(top1, "focused", "focused_p1"),
                "focused > focused_p1"),
        verdict("Ablation: the depthwise conv helps", "top-1 (%)", top1, better(top1, "focused", "focused_nodwc"),
                "focused > focused_nodwc"),
        verdict("Focused linear attention costs linear time in N", "slope of log time vs log N (largest two N)", ts,
                linear_cost, "focused < softmax and focused < 1.5"),
        verdict("... and linear memory", "slope of log peak memory vs log N", ms,
                better(ms, "focused", "softmax", higher=False), "focused < softmax"),
    ]


def _train_and_measure(ctx, s, data, label, kwargs, has_dwc, out):
    run_ = train_variant(ctx, label, BASE, dict(s["model_kwargs"], **kwargs), data, **s["train"])
    out["runs"][label] = {k: run_[k] for k in ("summary", "loss", "diverged", "wall_seconds", "model_kwargs")}
    nums = out["numbers"].setdefault(label, {})
    nums.update(top1=run_["summary"].get("top1"), train_seconds=run_["wall_seconds"])
    im = load_trained(run_)
    if im is None:
        return
    adata = analysis_data(data, im, 1, s["rank_images"], ctx.seed)
    m = rank_and_entropy(im.model, adata, s["rank_images"], has_dwc)
    nums.update({k: m[k] for k in ("rank", "rank_dwc", "rank_fraction", "entropy_norm")})
    out["curves"][label] = m["per_block"]


def _figures(ctx: Context, out: Dict[str, Any]) -> List:
    import os

    per = out["curves"]
    plot_curves([{"title": "rank of the attention matrix", "ylabel": "mean rank (heads, images)",
                  "curves": {m: c["rank"] for m, c in per.items()}},
                 {"title": "rank with the DWC term", "ylabel": "mean rank",
                  "curves": {m: c["rank_dwc"] for m, c in per.items()}},
                 {"title": "attention entropy (focus)", "ylabel": "entropy / log N",
                  "curves": {m: c["entropy_norm"] for m, c in per.items()}}],
                os.path.join(ctx.out, "rank_entropy.png"), title="Feature diversity and focus per block (Han et al. 2023)")
    cost = out["cost"]
    plot_curves([{"title": "forward time", "ylabel": "seconds per image", "log": True, "xlabel": "tokens N",
                  "x": cost["tokens"], "curves": {m: c["seconds"] for m, c in cost["models"].items()}},
                 {"title": "peak memory", "ylabel": "MiB per step", "log": True, "xlabel": "tokens N",
                  "x": cost["tokens"], "curves": {m: [v / 2 ** 20 if v else None for v in c["memory"]]
                                                  for m, c in cost["models"].items()}}],
                os.path.join(ctx.out, "cost_vs_tokens.png"), title="Cost against the number of tokens")
    return [("rank_entropy.png", "Rank of the attention matrix (without and with the DWC term) and entropy per block"),
            ("cost_vs_tokens.png", "Forward time and peak memory against the number of tokens (log-log)")]


def run(ctx: Context) -> Dict[str, Any]:
    s = settings(ctx)
    off, off_note = dwc_off(BASE, s["model_kwargs"])
    var = variants(off)
    data = study_data(ctx, s["per_class_train"], s["per_class_val"])
    out: Dict[str, Any] = {"numbers": {}, "curves": {}, "runs": {}}
    for label, (kwargs, has_dwc) in var.items():
        _train_and_measure(ctx, s, data, label, kwargs, has_dwc, out)
    ctx.log(f"[{ctx.name}] cost against the number of tokens at sizes {s['sizes']}")
    out["cost"] = cost_vs_tokens(BASE, s["model_kwargs"], {k: v[0] for k, v in var.items()}, s["sizes"],
                                 s["cost_batch"], s["cost_runs"])
    for label, c in out["cost"]["models"].items():
        out["numbers"].setdefault(label, {}).update(time_slope=c["time_slope"], memory_slope=c["memory_slope"])
    head_dim = s["model_kwargs"]["embed_dim"] // s["model_kwargs"]["num_heads"]
    notes = [f"Base model {BASE} with {s['model_kwargs']} (head dim {head_dim}); the five differ only in the "
             f"attention core; recipe {s['train']}, seed {ctx.seed}.", off_note,
             "'linear' keeps the rest of vitlab's focused_linear core: ReLU + 1e-6, the learnable per-channel "
             "softplus temperature and the zero-initialised key position encoding.",
             "Rank: torch.linalg.matrix_rank of every head's N x N matrix (class token included) on the first "
             "images, averaged; 'with the DWC term' adds the first DWC channel's kernel as a banded matrix "
             "(taps that cross a row of the patch grid dropped), takes |.| and renormalises rows (flatten.md §9).",
             "Cost: the median over runs of one inference forward pass of an untrained model, per image; slopes "
             "between the two largest token counts."]
    return {"settings": dict(s, dwc_off=off), "data": data, "models_order": list(ORDER), "numbers": out["numbers"],
            "number_keys": NUMBER_KEYS, "per_block": out["curves"], "cost": out["cost"], "runs": out["runs"],
            "figures": _figures(ctx, out) if out["curves"] else [], "notes": [n for n in notes if n],
            "verdicts": verdicts(out["numbers"], data["val_images"], head_dim)}
