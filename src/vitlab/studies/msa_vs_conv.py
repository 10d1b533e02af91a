"""Study ``msa_vs_conv``: ViT-Ti vs a ResNet vs AlterNet at CIFAR sizes (Park and Kim, "How Do Vision
Transformers Work?", ICLR 2022; ``shared/specs/how_vits_work.md`` §1).

Claims: MSAs are low-pass filters (lower the high-frequency amplitude and the feature-map variance),
convs high-pass (raise them); the ViT's Hessian eigenvalues are smaller in magnitude, with more
negative ones when data are few; MSAs are robust to high-frequency noise, convs are not; MSAs at
the end of stages (AlterNet) do not cost a CNN accuracy.  Instruments: ``features`` (Fourier and
variance), ``hessian`` (top eigenvalues by Lanczos and the density by stochastic Lanczos
quadrature) and the band-noise part of ``robustness``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from vitlab.studies.common import (Context, analysis_args, analysis_data, finite, load_trained, study_data,
                                   train_variant)
from vitlab.studies.report import accuracy_tolerance, all_hold, better, not_worse, verdict

NAME = "msa_vs_conv"
TITLE = "MSAs low-pass and flatten, convs high-pass"
PAPER = "Park and Kim, ICLR 2022"
COST = ("about 15 min on 2 idle CPU cores: a 6-block ViT-Ti (width 96), a pre-activation ResNet (1,1,2,2 bottleneck "
        "blocks) and its AlterNet trained 2 epochs on 1,000 CIFAR-10 images; Fourier, Hessian (30 Lanczos + 6 SLQ steps on 8 "
        "images) and band noise (5 frequencies) on 64 images; --quick: under a minute")
ORDER = ("vit", "resnet", "alternet")
NUMBER_KEYS = ("top1", "hf_change_attn", "hf_change_conv", "var_change_attn", "var_change_conv", "hessian_max_abs",
               "hessian_negative_mass", "noise_high_freq_delta", "train_seconds")
HIGH_FREQ = 0.5  # band-noise centres at or above this (units of pi) count as high frequency


def models(quick: bool) -> Dict[str, tuple]:
    if quick:
        return {"vit": ("vit_tiny_patch4_32", dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0)),
                "resnet": ("preact_resnet50_cifar", dict(layers=(1, 1, 1, 1))),
                "alternet": ("alternet50_cifar", dict(layers=(1, 1, 1, 2), msa_counts=(0, 0, 0, 1), window_size=2))}
    return {"vit": ("vit_tiny_patch4_32", dict(depth=6, embed_dim=96, num_heads=3, mlp_ratio=2.0)),
            "resnet": ("preact_resnet50_cifar", dict(layers=(1, 1, 2, 2))),
            "alternet": ("alternet50_cifar", dict(layers=(1, 1, 2, 2), msa_counts=(0, 0, 1, 1)))}


def settings(ctx: Context) -> Dict[str, Any]:
    if ctx.quick:
        return dict(per_class_train=4, per_class_val=2, images=8, noise_images=8, noise_frequencies=[0.1, 0.9],
                    hessian_models=["vit"], hessian=dict(hessian_k=2, hessian_iters=3, hessian_batch_size=4,
                                                         hessian_density_steps=3),
                    train=dict(epochs=ctx.budget(1), batch_size=8, lr=1e-3, warmup_epochs=0.0, max_steps=2,
                               img_size=16))
    return dict(per_class_train=100, per_class_val=100, images=128, noise_images=64,
                noise_frequencies=[0.1, 0.3, 0.5, 0.7, 0.9], hessian_models=list(ORDER),
                hessian=dict(hessian_k=3, hessian_iters=30, hessian_batch_size=8, hessian_density_steps=6),
                train=dict(epochs=ctx.budget(2), batch_size=32, lr=1e-3, warmup_epochs=0.5, weight_decay=0.05))


def block_changes(feats: Dict[str, Any], key: str, log_ratio: bool = False) -> Dict[str, Optional[float]]:
    """Mean change of ``key`` across the blocks of each kind (attn, conv, mlp), over the blocks whose
    input and output maps have the same size (a strided block compares different frequencies)."""
    import math

    acc: Dict[str, List[float]] = {}
    vals, shapes, kinds = feats[key], feats["shapes"], feats["kinds"]
    for i in range(1, len(vals)):
        a, b = vals[i - 1], vals[i]
        if not (finite(a) and finite(b)) or tuple(shapes[i][-2:]) != tuple(shapes[i - 1][-2:]):
            continue
        if log_ratio and (a <= 0 or b <= 0):
            continue
        acc.setdefault(kinds[i], []).append(math.log(b / a) if log_ratio else b - a)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _flat(v) -> List[float]:
    """Nested lists (one per SLQ probe) as one flat list."""
    return [x for item in v for x in _flat(item)] if isinstance(v, (list, tuple)) else [float(v)]


def _hessian(model, data, s) -> Dict[str, Any]:
    from vitlab.analysis.instruments import hessian

    args = analysis_args(hessian_batches=1, landscape_images=0, **s["hessian"])
    res = hessian.run(model, data, args, "")
    spec = res["max_eigenvalue_spectrum"]
    nodes, weights = _flat(res["density"]["nodes"]), _flat(res["density"]["weights"])
    neg = sum(w for n, w in zip(nodes, weights) if n < 0) / max(sum(weights), 1e-300)
    return {"spectrum": spec, "density": res["density"], "max_abs": max(abs(v) for v in spec + list(nodes)),
            "negative_mass": neg}


def _noise(model, data, s) -> Dict[str, Any]:
    from vitlab.analysis.robustness import noise_frequency_accuracy

    x, y = data.eval_x[: s["noise_images"]], data.eval_y[: s["noise_images"]]
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
    res = noise_frequency_accuracy(model, batches, s["noise_frequencies"], mean=data.mean, std=data.std)
    high = [100 * res["table"][str(f)]["delta_acc"] for f in res["frequencies"] if f >= HIGH_FREQ]
    return {"result": res, "high_delta": sum(high) / len(high) if high else None}


def measure(model, data, s: Dict[str, Any], hessian: bool = True) -> Dict[str, Any]:
    from vitlab.analysis.instruments import features

    feats = features.run(model, data, analysis_args(num_images=s["images"], batch_size=32), "")
    hf, var = block_changes(feats, "high_freq"), block_changes(feats, "variance", log_ratio=True)
    hes, noise = (_hessian(model, data, s) if hessian else None), _noise(model, data, s)
    nums = {"hf_change_attn": hf.get("attn"), "hf_change_conv": hf.get("conv"),
            "var_change_attn": var.get("attn"), "var_change_conv": var.get("conv"),
            "hessian_max_abs": hes["max_abs"] if hes else None,
            "hessian_negative_mass": hes["negative_mass"] if hes else None, "noise_high_freq_delta": noise["high_delta"]}
    return {"numbers": nums, "features": feats, "hessian": hes, "noise": noise["result"]}


def _sign(values: Dict[str, Any], names: Sequence[str], negative: bool) -> Optional[bool]:
    return all_hold([None if not finite(values.get(m)) else ((values[m] < 0) if negative else (values[m] > 0))
                     for m in names])


def verdicts(numbers: Dict[str, Dict[str, Any]], n_val: int) -> List[Dict[str, Any]]:
    """The verdict rows from the per-model numbers (pure: tested on synthetic numbers)."""
    def col(key):
        return {m: numbers.get(m, {}).get(key) for m in ORDER}

    top1, tol = col("top1"), accuracy_tolerance(col("top1").get("resnet"), n_val)
    return [
        verdict("MSAs are low-pass: they lower the high-frequency amplitude",
                "mean change of Δ log amplitude at π across MSA blocks", col("hf_change_attn"),
                _sign(col("hf_change_attn"), ("vit", "alternet"), True), "< 0 for vit and alternet"),
        verdict("Convs are high-pass: they raise the high-frequency amplitude",
                "mean change of Δ log amplitude at π across conv blocks", col("hf_change_conv"),
                _sign(col("hf_change_conv"), ("resnet", "alternet"), False), "> 0 for resnet and alternet"),
        verdict("MSAs reduce the feature-map variance", "mean log ratio of variance across MSA blocks",
                col("var_change_attn"), _sign(col("var_change_attn"), ("vit", "alternet"), True),
                "< 0 for vit and alternet"),
        verdict("Convs increase the feature-map variance", "mean log ratio of variance across conv blocks",
                col("var_change_conv"), _sign(col("var_change_conv"), ("resnet", "alternet"), False),
                "> 0 for resnet and alternet"),
        verdict("The ViT's Hessian eigenvalues are smaller in magnitude than the ResNet's",
                "largest |eigenvalue| (Lanczos top-k and SLQ nodes)", col("hessian_max_abs"),
                better(col("hessian_max_abs"), "vit", "resnet", higher=False), "vit < resnet"),
        verdict("With little data the ViT has more negative Hessian eigenvalues than the ResNet",
                "share of the SLQ spectral density below 0", col("hessian_negative_mass"),
                better(col("hessian_negative_mass"), "vit", "resnet"), "vit > resnet"),
        verdict("MSAs are robust to high-frequency noise, convs are not",
                f"accuracy change (% points) under band noise at >= {HIGH_FREQ} pi", col("noise_high_freq_delta"),
                better(col("noise_high_freq_delta"), "vit", "resnet"), "vit > resnet (smaller drop)"),
        verdict("MSAs at the end of stages cost the CNN no accuracy (AlterNet)", "top-1 (%)", top1,
                not_worse(top1, "alternet", "resnet", tol), f"alternet >= resnet - {tol:.2f}"),
    ]


def _figures(ctx: Context, feats, hes, noise) -> List:
    from vitlab.analysis.fourier import plot_fourier, plot_variance
    from vitlab.analysis.hessian import plot_eigenvalue_spectra
    from vitlab.analysis.robustness import plot_noise_frequency

    P = lambda n: os.path.join(ctx.out, n)  # noqa: E731
    plot_fourier(feats, P("fourier.png"), title="Relative log amplitude of the feature maps")
    plot_variance(feats, P("variance.png"))
    plot_eigenvalue_spectra({m: h["spectrum"] for m, h in hes.items()}, P("hessian_spectrum.png"))
    _plot_density(hes, P("hessian_density.png"))
    plot_noise_frequency(noise, P("noise_frequency.png"))
    return [("fourier.png", "Δ log amplitude by frequency and at π across normalised depth (MSA halves shaded)"),
            ("variance.png", "Feature-map variance across normalised depth"),
            ("hessian_spectrum.png", "Top Hessian eigenvalues per mini-batch (KDE)"),
            ("hessian_density.png", "Hessian eigenvalue density by stochastic Lanczos quadrature"),
            ("noise_frequency.png", "Accuracy change under band-limited noise by frequency (Fig. 3 of the paper)")]


def _plot_density(hes, path) -> None:
    from vitlab.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m, h in hes.items():
        d = h["density"]
        ax.semilogy(d["grid"], [max(v, 1e-12) for v in d["density"]], label=m)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run(ctx: Context) -> Dict[str, Any]:
    s = settings(ctx)
    data = study_data(ctx, s["per_class_train"], s["per_class_val"])
    numbers, feats, hes, noise, runs = {}, {}, {}, {}, {}
    for label, (model, kwargs) in models(ctx.quick).items():
        run_ = train_variant(ctx, label, model, kwargs, data, **s["train"])
        runs[label] = {k: run_[k] for k in ("summary", "loss", "diverged", "wall_seconds", "model", "model_kwargs")}
        numbers[label] = {"top1": run_["summary"].get("top1"), "train_seconds": run_["wall_seconds"]}
        im = load_trained(run_)
        if im is None:
            continue
        n_train = s["hessian"]["hessian_batch_size"]
        adata = analysis_data(data, im, n_train, max(s["images"], s["noise_images"]), ctx.seed)
        m = measure(im.model, adata, s, hessian=label in s["hessian_models"])
        numbers[label].update(m["numbers"])
        feats[label], noise[label] = m["features"], m["noise"]
        if m["hessian"]:
            hes[label] = m["hessian"]
    notes = [f"Models: {models(ctx.quick)}; recipe {s['train']} for all three, seed {ctx.seed}.",
             "Block changes are taken across blocks whose input and output maps have the same size; the ResNet and "
             "AlterNet share their conv layout, AlterNet swapping the last block of stages 3 and 4 for an MSA block.",
             f"Hessian of the training loss (soft-target cross-entropy on augmented training images, no weight decay): "
             f"{s['hessian']}, on {', '.join(s['hessian_models'])}" + (" (quick: the conv models' Hessians are "
                                                                          "skipped, their rows read n/a)" if ctx.quick
                                                                         else "") + "."]
    return {"settings": s, "data": data, "models_order": list(ORDER), "numbers": numbers, "number_keys": NUMBER_KEYS,
            "features": feats, "hessian": hes, "noise": noise, "runs": runs, "notes": notes,
            "figures": _figures(ctx, feats, hes, noise) if feats else [], "verdicts": verdicts(numbers, data["val_images"])}
