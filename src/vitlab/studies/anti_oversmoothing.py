"""Study ``anti_oversmoothing``: a deep small ViT vs the same with AttnScale vs with FeatScale
(Wang et al., "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis",
ICLR 2022; ``shared/specs/anti_oversmoothing.md``).

Claim: both techniques keep more high-frequency energy in late blocks (‖HC‖/‖DC‖ of the tokens)
and lower patch uniformity (mean cosine similarity of tokens) and attention collapse (similarity
of consecutive attention maps), at no loss of accuracy.  Measured on the block outputs of
``forward_halves`` (the ``fourier``/``oversmoothing`` instrument) and on ``record_attention`` maps.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from vitlab.studies.common import (Context, analysis_args, analysis_data, late_mean, load_trained, study_data,
                                   train_variant)
from vitlab.studies.report import accuracy_tolerance, better, not_worse, plot_curves, verdict

NAME = "anti_oversmoothing"
TITLE = "AttnScale / FeatScale against oversmoothing in a deep ViT"
PAPER = "Wang et al., ICLR 2022"
COST = ("about 8 min on 2 idle CPU cores: three 12-block ViTs (width 64) trained 3 epochs on 3,000 CIFAR-10 images, "
        "one analysis pass each; --quick: under a minute")
BASE = "vit_tiny_patch4_32"
VARIANTS = {"vit": {}, "attnscale": {"mixer": "attnscale"}, "featscale": {"featscale": True}}
NUMBER_KEYS = ("top1", "hc_dc_late", "cos_sim_late", "collapse_late", "high_freq_late", "train_seconds")


def settings(ctx: Context) -> Dict[str, Any]:
    """The fixed budget (chosen before the recorded run; ``--epochs`` overrides the epochs)."""
    if ctx.quick:
        return dict(model_kwargs=dict(depth=3, embed_dim=32, num_heads=2, mlp_ratio=2.0), per_class_train=4,
                    per_class_val=2, train=dict(epochs=ctx.budget(1), batch_size=8, lr=1e-3, warmup_epochs=0.0,
                                                max_steps=2), feature_images=8, attention_images=4)
    return dict(model_kwargs=dict(depth=12, embed_dim=64, num_heads=2, mlp_ratio=2.0), per_class_train=300,
                per_class_val=100, train=dict(epochs=ctx.budget(3), batch_size=64, lr=1e-3, warmup_epochs=0.5,
                                              weight_decay=0.05), feature_images=256, attention_images=32)


def _block_outputs(feats: Dict[str, Any], key: str) -> List[Any]:
    """Per-block values of ``key`` at the block outputs (the MLP halves)."""
    return [v for v, k in zip(feats[key], feats["kinds"]) if k == "mlp"]


def measure(model, data, s: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """Token and attention measures across depth (instrument ``features`` and ``record_attention``)."""
    from vitlab.analysis.attention import attention_maps
    from vitlab.analysis.data import normalize
    from vitlab.analysis.instruments import features
    from vitlab.analysis.oversmoothing import attention_collapse

    args = analysis_args(num_images=s["feature_images"], batch_size=32)
    feats = features.run(model, data, args, out_dir)
    x = normalize(data.eval_x[: s["attention_images"]], data.norm)
    maps = list(attention_maps(model, x).values())
    curves = {"hc_dc": _block_outputs(feats, "hc_dc"), "cos_sim": _block_outputs(feats, "cos_sim"),
              "high_freq": _block_outputs(feats, "high_freq"), "collapse": attention_collapse(maps)}
    numbers = {f"{k}_late": late_mean(v) for k, v in curves.items()}
    return {"numbers": numbers, "curves": curves, "features": feats}


def verdicts(numbers: Dict[str, Dict[str, Any]], n_val: int) -> List[Dict[str, Any]]:
    """The verdict rows from the per-model numbers (pure: tested on synthetic numbers)."""
    def col(key):
        return {m: numbers.get(m, {}).get(key) for m in VARIANTS}

    rows = []
    for tech in ("attnscale", "featscale"):
        name = "AttnScale" if tech == "attnscale" else "FeatScale"
        rows.append(verdict(f"{name} keeps more high-frequency energy in late blocks",
                            "‖HC‖/‖DC‖ of the tokens, last third of blocks", col("hc_dc_late"),
                            better(col("hc_dc_late"), tech, "vit", higher=True), f"{tech} > vit"))
        rows.append(verdict(f"{name} lowers patch uniformity in late blocks",
                            "mean cosine similarity of patch tokens, last third", col("cos_sim_late"),
                            better(col("cos_sim_late"), tech, "vit", higher=False), f"{tech} < vit"))
        rows.append(verdict(f"{name} counters attention collapse",
                            "cosine similarity of consecutive attention maps, last third", col("collapse_late"),
                            better(col("collapse_late"), tech, "vit", higher=False), f"{tech} < vit"))
        tol = accuracy_tolerance(col("top1").get("vit"), n_val)
        rows.append(verdict(f"{name} costs no accuracy", "top-1 (%) on the validation subset", col("top1"),
                            not_worse(col("top1"), tech, "vit", tol),
                            f"{tech} >= vit - {tol:.2f} (2 binomial standard errors on {n_val} images)"))
    return rows


def _figures(ctx: Context, curves: Dict[str, Dict[str, List]], feats: Dict[str, Dict]) -> List:
    from vitlab.analysis.fourier import plot_fourier

    def panel(key, title, ylabel, log=False, xlabel="block"):
        return {"title": title, "ylabel": ylabel, "log": log, "xlabel": xlabel,
                "curves": {m: c[key] for m, c in curves.items()}}

    plot_curves([panel("hc_dc", "high-frequency / DC energy", "‖HC‖/‖DC‖ (tokens)", log=True),
                 panel("cos_sim", "patch uniformity", "mean cosine similarity of tokens"),
                 panel("collapse", "attention collapse", "cos sim of attention maps, block l vs l+1",
                       xlabel="block pair (l, l+1)")],
                os.path.join(ctx.out, "oversmoothing.png"), title="Oversmoothing across depth (Wang et al. 2022)")
    plot_fourier(feats, os.path.join(ctx.out, "fourier.png"), title="Relative log amplitude of the feature maps")
    return [("oversmoothing.png", "HC/DC energy ratio, patch uniformity and attention collapse across depth"),
            ("fourier.png", "Δ log amplitude by frequency (first model) and at the highest frequency vs depth")]


def run(ctx: Context) -> Dict[str, Any]:
    s = settings(ctx)
    data = study_data(ctx, s["per_class_train"], s["per_class_val"])
    numbers, curves, feats, runs = {}, {}, {}, {}
    for label, parts in VARIANTS.items():
        run_ = train_variant(ctx, label, BASE, dict(s["model_kwargs"], **parts), data, **s["train"])
        runs[label] = {k: run_[k] for k in ("summary", "loss", "diverged", "wall_seconds", "model_kwargs")}
        numbers[label] = {"top1": run_["summary"].get("top1"), "train_seconds": run_["wall_seconds"]}
        im = load_trained(run_)
        if im is None:
            continue
        adata = analysis_data(data, im, 1, s["feature_images"], ctx.seed)
        m = measure(im.model, adata, s, os.path.join(ctx.work, "analysis", label))
        numbers[label].update(m["numbers"])
        curves[label], feats[label] = m["curves"], m["features"]
    figures = _figures(ctx, curves, feats) if curves else []
    notes = [f"Base model {BASE} with {s['model_kwargs']}; the three differ only in the part under study, "
             f"same seed {ctx.seed}, data order and recipe {s['train']}.",
             "Late blocks = the last third of the blocks; token measures on patch tokens of the block outputs "
             "(class token excluded); attention maps of all heads and queries."]
    return {"settings": s, "data": data, "models_order": list(VARIANTS), "numbers": numbers, "number_keys": NUMBER_KEYS,
            "curves": curves, "features": feats, "runs": runs, "figures": figures, "notes": notes,
            "verdicts": verdicts(numbers, data["val_images"])}
