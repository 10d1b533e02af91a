"""Study ``small_data``: a plain small ViT vs the same with shifted patch tokenization (SPT), with
locality self-attention (LSA) and with both, and a compact convolutional transformer (CCT), all trained
from scratch on the same small CIFAR-10 subset with the same recipe and budget (Lee, Lee and Song,
"Vision Transformer for Small-Size Datasets", 2021, sec. 3-4; Hassani et al., "Escaping the Big Data
Paradigm with Compact Transformers", 2021, sec. 3-4; as collected in vit-pytorch).

Claims: (a) SPT and LSA each improve the plain ViT and together improve it most; (b) CCT beats the
plain ViT.  Measures: top-1 of every model; the mean attention entropy (LSA's sharper attention, Lee et
al. sec. 3.2 and Fig. 5) and the mean attention distance in pixels (``vitlab.analysis.attention``, the
statistics of the ``attention`` instrument).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from vitlab.studies.common import Context, analysis_data, finite, load_trained, study_data, train_variant
from vitlab.studies.report import accuracy_tolerance, all_hold, better, plot_curves, verdict

NAME = "small_data"
TITLE = "SPT + LSA and CCT help a ViT trained from scratch on a small data set"
PAPER = "Lee et al., 2021; Hassani et al., 2021"
COST = ("under 20 min on 2 idle CPU cores (1,144 s of CPU time on one thread): four 4-block small-data ViTs "
        "(width 64, plain / SPT / LSA / both) and a CCT-7/3x1 of the same width and depth, each trained 12 epochs "
        "on 5,000 CIFAR-10 images; attention "
        "statistics on 64 images; --quick: under a minute")
MODELS = {"vit": "vit_small_data_patch4_32", "spt": "vit_small_data_spt_patch4_32",
          "lsa": "vit_small_data_lsa_patch4_32", "sl": "vit_small_data_sl_patch4_32", "cct": "cct_7_3x1_32"}
ORDER = tuple(MODELS)
# CCT's recipe has attention dropout and stochastic depth 0.1; the ViT recipes have none: equal regularisation
CCT_EXTRA = dict(attn_drop_rate=0.0, drop_path_rate=0.0)
NUMBER_KEYS = ("top1", "params", "tokens", "entropy_norm", "entropy", "distance_px", "final_loss", "train_seconds")


def settings(ctx: Context) -> Dict[str, Any]:
    """The fixed budget (chosen before the recorded run; ``--epochs`` overrides the epochs)."""
    if ctx.quick:
        return dict(model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0), per_class_train=4,
                    per_class_val=2, attention_images=4,
                    train=dict(epochs=ctx.budget(1), batch_size=8, lr=1e-3, warmup_epochs=0.0, max_steps=2))
    # the paper's ViT (depth 9, dim 192, 12 heads of 16, MLP ratio 2) shrunk to depth 4, dim 64, 4 heads of 16
    return dict(model_kwargs=dict(depth=4, embed_dim=64, num_heads=4, mlp_ratio=2.0), per_class_train=500,
                per_class_val=100, attention_images=64,
                train=dict(epochs=ctx.budget(12), batch_size=64, lr=1e-3, warmup_epochs=1.0, weight_decay=0.05,
                           smoothing=0.1))


def model_kwargs(label: str, s: Dict[str, Any]) -> Dict[str, Any]:
    """The shared size, plus CCT's regularisation switched to the ViTs' (none)."""
    return dict(s["model_kwargs"], **(CCT_EXTRA if label == "cct" else {}))


def _mean(values: Optional[List[float]]) -> Optional[float]:
    vals = [v for v in (values or []) if finite(v)]
    return sum(vals) / len(vals) if vals else None


def attention_measures(stats: Dict[str, Any]) -> Dict[str, Any]:
    """Per-block curves and their means from :func:`vitlab.analysis.attention.attention_statistics`:
    entropy (nats), entropy / log N_key (1 = uniform attention) and mean attention distance (pixels),
    each averaged over heads."""
    ent = [_mean(e) for e in stats["entropy"]]
    ent_norm = [e / u if (e is not None and u > 0) else None for e, u in zip(ent, stats["entropy_uniform"])]
    dist = [_mean(d) for d in stats["distance_px"]]
    curves = {"entropy": ent, "entropy_norm": ent_norm, "distance_px": dist}
    return {"curves": curves, "numbers": {k: _mean(v) for k, v in curves.items()}}


def measure(run_: Dict[str, Any], data: Dict[str, Any], s: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """Top-1, parameter count, tokens and the attention statistics of one trained model."""
    from vitlab.analysis.attention import attention_statistics
    from vitlab.analysis.data import normalize

    losses = run_["loss"]
    tail = losses[-max(1, len(losses) // 10):]
    nums: Dict[str, Any] = {"top1": run_["summary"].get("top1"), "train_seconds": run_["wall_seconds"],
                            "final_loss": sum(tail) / len(tail) if tail else None}
    im = load_trained(run_)
    if im is None:
        return {"numbers": nums, "curves": {}}
    nums["params"] = sum(p.numel() for p in im.model.parameters())
    adata = analysis_data(data, im, 1, s["attention_images"], seed)
    x = normalize(adata.eval_x[: s["attention_images"]], adata.norm)
    stats = attention_statistics(im.model, x, batch_size=32, max_images=s["attention_images"])
    nums["tokens"] = stats["shapes"][0][-1] if stats["shapes"] else None
    att = attention_measures(stats)
    nums.update(att["numbers"])
    return {"numbers": nums, "curves": att["curves"]}


def _lower_with_lsa(values: Dict[str, Any]) -> Optional[bool]:
    """LSA lowers ``values`` with and without SPT: lsa < vit and sl < spt."""
    return all_hold([better(values, "lsa", "vit", higher=False), better(values, "sl", "spt", higher=False)])


def verdicts(numbers: Dict[str, Dict[str, Any]], n_val: int) -> List[Dict[str, Any]]:
    """The verdict rows from the per-model numbers (pure: tested on synthetic numbers)."""
    def col(key):
        return {m: numbers.get(m, {}).get(key) for m in ORDER}

    top1 = col("top1")
    tol = accuracy_tolerance(top1.get("vit"), n_val)
    se = f"(2 s.e. on {n_val} images: {tol:.1f} points)"
    most = all_hold([better(top1, "sl", m) for m in ("vit", "spt", "lsa")])
    return [
        verdict("SPT improves the plain ViT", "top-1 (%)", top1, better(top1, "spt", "vit"), f"spt > vit {se}"),
        verdict("LSA improves the plain ViT", "top-1 (%)", top1, better(top1, "lsa", "vit"), f"lsa > vit {se}"),
        verdict("SPT and LSA together improve it most", "top-1 (%)", top1, most, "sl > vit, spt and lsa"),
        verdict("CCT beats the plain ViT", "top-1 (%)", top1, better(top1, "cct", "vit"), f"cct > vit {se}"),
        verdict("LSA sharpens the attention", "mean attention entropy / log N (over blocks, heads and images)",
                col("entropy_norm"), _lower_with_lsa(col("entropy_norm")), "lsa < vit and sl < spt"),
        verdict("LSA makes the attention more local", "mean attention distance (pixels)", col("distance_px"),
                _lower_with_lsa(col("distance_px")), "lsa < vit and sl < spt"),
    ]


def _plot_top1(top1: Dict[str, Any], params: Dict[str, Any], tol: float, path: str) -> None:
    from vitlab.plotting import pyplot, save_figure

    plt = pyplot()
    labels = [m for m in ORDER if finite(top1.get(m))]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    bars = ax.bar(labels, [top1[m] for m in labels], yerr=[tol / 2] * len(labels), capsize=3,
                  color=["#8c8c8c", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(labels)])
    for b, m in zip(bars, labels):
        p = params.get(m)
        ax.annotate(f"{p / 1e3:.0f}k" if finite(p) else "", (b.get_x() + b.get_width() / 2, 0), ha="center",
                    va="bottom", fontsize=7, color="white", xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("top-1 (%)  (bars: 1 s.e.)")
    ax.set_title("Top-1 at equal budget (parameters at the base)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def _figures(ctx: Context, numbers, curves, losses, tol: float) -> List:
    P = lambda n: os.path.join(ctx.out, n)  # noqa: E731
    _plot_top1({m: numbers[m].get("top1") for m in numbers}, {m: numbers[m].get("params") for m in numbers}, tol,
               P("top1.png"))
    plot_curves([{"title": "attention entropy", "ylabel": "entropy / log N (1: uniform)",
                  "curves": {m: c["entropy_norm"] for m, c in curves.items()}},
                 {"title": "attention distance", "ylabel": "mean attention distance (pixels)",
                  "curves": {m: c["distance_px"] for m, c in curves.items()}}],
                P("attention_blocks.png"), title="Attention per block (mean over heads)")
    plot_curves([{"title": "training loss (10-step mean)", "ylabel": "loss", "xlabel": "step",
                  "curves": {m: [sum(v[max(0, i - 9):i + 1]) / len(v[max(0, i - 9):i + 1]) for i in range(len(v))]
                             for m, v in losses.items()}}], P("loss_curves.png"))
    return [("top1.png", "Top-1 of the five models at equal budget (error bars: one binomial standard error)"),
            ("attention_blocks.png", "Attention entropy (normalised by log N) and mean attention distance per block"),
            ("loss_curves.png", "Training loss per step")]


def run(ctx: Context) -> Dict[str, Any]:
    s = settings(ctx)
    data = study_data(ctx, s["per_class_train"], s["per_class_val"])
    numbers, curves, losses, runs = {}, {}, {}, {}
    for label, model in MODELS.items():
        run_ = train_variant(ctx, label, model, model_kwargs(label, s), data, **s["train"])
        runs[label] = {k: run_[k] for k in ("summary", "diverged", "wall_seconds", "model", "model_kwargs")}
        m = measure(run_, data, s, ctx.seed)
        numbers[label], losses[label] = m["numbers"], run_["loss"]
        if m["curves"]:
            curves[label] = m["curves"]
    tol = accuracy_tolerance(numbers["vit"].get("top1"), data["val_images"])
    notes = [f"Models: {MODELS}, all with {s['model_kwargs']}; CCT also with {CCT_EXTRA} (its recipe's attention "
             f"dropout and stochastic depth, which the ViT recipes do not have). Recipe for all five: {s['train']} "
             f"(AdamW, cosine schedule, pad-and-crop + horizontal flip, label smoothing), seed {ctx.seed}.",
             "CCT-7/3x1 tokenises 32 px images with one 3x3 conv and a stride-2 max-pool into 16x16 = 256 tokens "
             "(the ViTs: 8x8 patches of 4 px + a class token = 65), so at equal width and depth it costs several "
             "times the compute per step of the ViTs: equal budget here means equal epochs and steps.",
             "Entropy and distance: vitlab.analysis.attention.attention_statistics on the first validation images; "
             "entropy over all keys (LSA masks the diagonal), normalised by log N_key; distance over patch keys, "
             "in pixels (4 per ViT token, 2 per CCT token)."]
    return {"settings": dict(s, cct_extra=CCT_EXTRA), "data": data, "models_order": list(ORDER), "numbers": numbers,
            "number_keys": NUMBER_KEYS, "per_block": curves, "losses": losses, "runs": runs, "notes": notes,
            "figures": _figures(ctx, numbers, curves, losses, tol) if curves else [],
            "verdicts": verdicts(numbers, data["val_images"])}
