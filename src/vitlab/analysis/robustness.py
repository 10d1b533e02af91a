"""Corruption robustness: accuracy per corruption and severity on any evaluation set, on the fly.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019); reported as in Park & Kim, "How Do Vision Transformers Work?"
(ICLR 2022) §8: every metric per (corruption, severity) and the mean accuracy over all sets.
Images are corrupted in [0, 1] pixel space by :func:`vitlab.analysis.corrupt`, then normalised
with the model's mean/std.  Grey-scale images are replicated to 3 channels for the
corruption and averaged back.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

from vitlab.analysis.corruptions import CORRUPTIONS, corrupt
from vitlab.plotting import pyplot, save_figure

__all__ = ["corruption_accuracy", "corrupt_any_channels", "plot_corruption_table", "band_mask", "band_noise",
           "noise_frequency_accuracy", "plot_noise_frequency"]

NOISE_FREQUENCIES = tuple(round(0.1 * i, 1) for i in range(1, 10))  # band centres, in units of pi


def corrupt_any_channels(images: torch.Tensor, name: str, severity: int, seed: Optional[int] = None) -> torch.Tensor:
    """:func:`corrupt` for 1- or 3-channel images in [0, 1] (1 channel: replicated, corrupted,
    averaged back)."""
    if images.dim() == 4 and images.shape[1] == 1:
        return corrupt(images.expand(-1, 3, -1, -1).contiguous(), name, severity, seed=seed).mean(1, keepdim=True)
    return corrupt(images, name, severity, seed=seed)


def _scorer(model: torch.nn.Module, batches: Iterable, mean: Optional[Sequence[float]],
            std: Optional[Sequence[float]]):
    """``score(transform)`` -> ``{"acc", "nll"}`` of ``model`` on ``transform(images, batch_index)``
    of every batch (images in [0, 1], normalised with ``mean``/``std``, default the model's
    ``default_cfg``), with the model in eval mode; also returns its former training flag."""
    cfg = getattr(model, "default_cfg", {}) or {}
    mean = mean if mean is not None else cfg.get("mean")
    std = std if std is not None else cfg.get("std")
    if not batches:
        raise ValueError("no evaluation batches")
    was = model.training
    model.eval()

    def norm(x):
        if mean is None or std is None:
            return x
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - m) / s

    def score(transform):
        correct, nll, n = 0, 0.0, 0
        for i, (x, y) in enumerate(batches):
            out = model(norm(transform(x, i)))
            correct += int((out.argmax(-1) == y).sum())
            nll += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            n += len(y)
        return {"acc": correct / n, "nll": nll / n}
    return score, was


@torch.no_grad()
def corruption_accuracy(model: torch.nn.Module, batches: Iterable, corruptions: Sequence[str] = CORRUPTIONS,
                        severities: Sequence[int] = (1, 2, 3, 4, 5), mean: Optional[Sequence[float]] = None,
                        std: Optional[Sequence[float]] = None, seed: int = 0, progress: bool = False) -> Dict:
    """Accuracy (and NLL) of ``model`` on every corrupted copy of ``batches``.

    ``batches``: ``(images, labels)`` pairs with images **un-normalised** in [0, 1]; ``mean``/``std``
    (default: ``model.default_cfg``) are applied after corrupting.  Returns ``clean`` accuracy,
    ``table[name][str(severity)] = {"acc", "nll"}``, ``per_corruption`` (mean accuracy over the
    severities), ``per_severity`` and ``mean_accuracy`` (over all corruption×severity sets), plus
    ``num_images``.  Cost: len(corruptions)·len(severities)+1 passes over ``batches``.
    """
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption(s) {bad}; valid: {', '.join(CORRUPTIONS)}")
    bad = [s for s in severities if not (isinstance(s, int) and 1 <= s <= 5)]
    if bad:
        raise ValueError(f"severities must be integers in 1..5, got {bad}")
    batches = list(batches)
    score, was = _scorer(model, batches, mean, std)
    jobs = [(c, s) for c in corruptions for s in severities]
    it = jobs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(jobs, desc="corruptions", leave=False)
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    try:
        clean = score(lambda x, i: x)
        for c, s in it:
            table.setdefault(c, {})[str(s)] = score(
                lambda x, i, c=c, s=s: corrupt_any_channels(x, c, s, seed=seed * 100003 + i))
    finally:
        model.train(was)
    per_c = {c: sum(v["acc"] for v in table[c].values()) / len(table[c]) for c in table}
    per_s = {str(s): sum(table[c][str(s)]["acc"] for c in table) / len(table) for s in severities} if table else {}
    accs = [v["acc"] for c in table for v in table[c].values()]
    return {"clean": clean, "table": table, "per_corruption": per_c, "per_severity": per_s,
            "mean_accuracy": sum(accs) / len(accs) if accs else None,
            "num_images": sum(len(y) for _, y in batches), "severities": list(severities)}


def plot_corruption_table(results: Dict[str, Dict], path):
    """Grouped bars: mean accuracy over severities per corruption (one bar per model), with
    the clean accuracy and mean corruption accuracy in the legend."""
    plt = pyplot()
    import numpy as np

    names = list(dict.fromkeys(c for r in results.values() for c in r["per_corruption"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) * max(1, len(results)) + 2), 3.8))
    width = 0.8 / max(len(results), 1)
    for i, (label, r) in enumerate(results.items()):
        vals = [100 * r["per_corruption"].get(c, float("nan")) for c in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width,
               label=f"{label} (clean {100 * r['clean']['acc']:.1f}, mean {100 * (r['mean_accuracy'] or 0):.1f})")
    ax.set_xticks(np.arange(len(names)) + width * (len(results) - 1) / 2)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# -- noise-frequency robustness ------------------------------------------------------------------
def band_mask(size, center: float, width: float, allow_empty: bool = False) -> torch.Tensor:
    """Boolean ``(H, W)`` mask of the 2-D DFT frequencies (``torch.fft.fft2`` layout) whose
    radius ``max(|w_y|, |w_x|)`` (angular frequency in units of pi, so the band is a square ring
    and the Fourier-diagonal frequency of :mod:`vitlab.analysis.fourier` lies on it) falls in
    ``[center - width/2, center + width/2]``.  A band with no frequency of the grid is an error
    unless ``allow_empty`` (then the mask is all False)."""
    h, w = (size, size) if isinstance(size, int) else size
    if not (0 < center <= 1 and width > 0):
        raise ValueError(f"band centre must be in (0, 1] and width > 0 (units of pi), got {center}, {width}")
    fy = torch.fft.fftfreq(h, dtype=torch.float64).abs() * 2  # cycles/pixel * 2 = angular frequency / pi
    fx = torch.fft.fftfreq(w, dtype=torch.float64).abs() * 2
    r = torch.maximum(fy[:, None], fx[None, :])
    eps = 1e-9
    mask = (r >= center - width / 2 - eps) & (r <= center + width / 2 + eps)
    if not (allow_empty or mask.any()):
        raise ValueError(f"no frequency of a {h}x{w} image lies in the band {center} +- {width / 2} (units of pi; "
                         f"grid step {2 / min(h, w):.3g}): widen the band")
    return mask


def band_noise(shape, center: float, width: float = 0.1, rms: float = 0.1,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise restricted to one frequency band: white noise of ``shape`` ``(..., H, W)``,
    its 2-D spectrum zeroed outside :func:`band_mask`, transformed back (real part; the mask is
    symmetric, so it is real up to rounding) and scaled so that every ``(H, W)`` map has
    root-mean-square ``rms``."""
    if rms < 0:
        raise ValueError(f"noise rms must be >= 0, got {rms}")
    mask = band_mask(shape[-2:], center, width)
    white = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.fft.ifft2(torch.fft.fft2(white) * mask).real
    noise = noise * (rms / noise.pow(2).mean((-2, -1), keepdim=True).sqrt().clamp_min(1e-12))
    return noise.float()


@torch.no_grad()
def noise_frequency_accuracy(model: torch.nn.Module, batches: Iterable,
                             frequencies: Sequence[float] = NOISE_FREQUENCIES, width: float = 0.1,
                             rms: float = 0.1, clip: bool = True, mean: Optional[Sequence[float]] = None,
                             std: Optional[Sequence[float]] = None, seed: int = 0) -> Dict:
    """Robustness to noise by frequency (Park & Kim, "How Do Vision Transformers Work?" ICLR 2022,
    Fig. 3): accuracy with :func:`band_noise` of root-mean-square ``rms`` (in [0, 1] pixel units)
    in the band ``f +- width/2`` (units of pi) added to every image, for each centre ``f``, and
    the change from the clean accuracy.  Images (``(images, labels)`` batches, un-normalised in
    [0, 1]) are clipped back to [0, 1] unless ``clip=False``.  The paper's band width and noise
    magnitude are not published; these defaults are vitlab's.  Returns ``clean``,
    ``table[str(f)] = {"acc", "nll", "delta_acc"}``, ``frequencies``, ``width``, ``rms``."""
    batches = list(batches)
    frequencies = [round(float(f), 6) for f in frequencies]
    score, was = _scorer(model, batches, mean, std)
    for f in frequencies:  # fail before any forward pass
        band_mask(batches[0][0].shape[-2:], f, width)

    def noisy(f: float):
        def transform(x, i):
            g = torch.Generator().manual_seed(seed * 100003 + i * 1009 + int(round(f * 1000)))
            out = x + band_noise(x.shape, f, width, rms, g).to(x.device, x.dtype)
            return out.clamp(0, 1) if clip else out
        return transform

    try:
        clean = score(lambda x, i: x)
        table = {}
        for f in frequencies:
            r = score(noisy(f))
            table[str(f)] = dict(r, delta_acc=r["acc"] - clean["acc"])
    finally:
        model.train(was)
    return {"clean": clean, "table": table, "frequencies": frequencies, "width": width,
            "rms": rms, "clip": clip, "num_images": sum(len(y) for _, y in batches)}


def plot_noise_frequency(results: Dict[str, Dict], path):
    """Accuracy change (percentage points) vs noise frequency, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for label, r in results.items():
        fs = r["frequencies"]
        ax.plot(fs, [100 * r["table"][str(f)]["delta_acc"] for f in fs], marker="o", label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("noise frequency (× π)")
    ax.set_ylabel("accuracy change (% points)")
    r0 = next(iter(results.values()), {})
    ax.set_title(f"band noise, width {r0.get('width', 0):.2g}π, rms {r0.get('rms', 0):.2g}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
