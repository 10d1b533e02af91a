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

__all__ = ["corruption_accuracy", "corrupt_any_channels", "plot_corruption_table"]


def corrupt_any_channels(images: torch.Tensor, name: str, severity: int, seed: Optional[int] = None) -> torch.Tensor:
    """:func:`corrupt` for 1- or 3-channel images in [0, 1] (1 channel: replicated, corrupted,
    averaged back)."""
    if images.dim() == 4 and images.shape[1] == 1:
        return corrupt(images.expand(-1, 3, -1, -1).contiguous(), name, severity, seed=seed).mean(1, keepdim=True)
    return corrupt(images, name, severity, seed=seed)


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
    cfg = getattr(model, "default_cfg", {}) or {}
    mean = mean if mean is not None else cfg.get("mean")
    std = std if std is not None else cfg.get("std")
    batches = list(batches)
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
