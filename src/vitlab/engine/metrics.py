"""Calibration and uncertainty metrics (Acc, Acc-90, NLL, ECE, IoU, IoU-90, Unc-90, Freq-90, Brier)
and the reliability diagram, used by training (validation), ``vitlab eval`` and ``vitlab analyze``.

They live in the engine because training and evaluation need them and the engine must not
import ``vitlab.analysis``; ``vitlab.analysis.calibration`` re-exports them.

Definitions follow Park & Kim, "How Do Vision Transformers Work?" (ICLR 2022), §9 of
``shared/specs/how_vits_work.md``; ECE is the top-label expected calibration error of
Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017) and Naeini et al.,
"Obtaining Well Calibrated Probabilities Using Bayesian Binning" (AAAI 2015).

Bins are equal-width on [0, 1] with float64 edges ``torch.linspace(0, 1, n_bins + 1)`` and
closed on the right, ``(start, end]``: a confidence exactly on an inner edge ``e_j`` belongs to
the bin that **ends** at ``e_j`` (the lower one), a confidence of exactly 0 goes into the first
bin and 1 into the last.  The same bins serve counts, accuracy and confidence.  (torchmetrics'
``binary/multiclass_calibration_error`` uses ``[start, end)``; the two differ only for
confidences exactly on an edge.)  Confidences are compared in float64, after the input's
own dtype: a float32 ``1/3`` is not the float64 edge ``1/3``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from vitlab.plotting import pyplot, save_figure

__all__ = [
    "calibration_metrics",
    "expected_calibration_error",
    "reliability_bins",
    "plot_reliability_diagram",
]


def _check(probs, labels, n_bins):
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels)
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, K), got shape {tuple(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({probs.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probs is empty (N = 0); need at least one sample")
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if probs.is_floating_point() is False:
        raise ValueError(f"probs must be a float tensor of probabilities, got dtype {probs.dtype}")
    labels = labels.long()
    k = probs.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}] for K = {k} classes, got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if probs.numel() and (probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax to logits first), got "
                         f"range [{float(probs.min()):.4g}, {float(probs.max()):.4g}]")
    return probs.detach().double().cpu(), labels.detach().cpu()


def reliability_bins(probs, labels, n_bins: int = 15) -> Dict[str, torch.Tensor]:
    """Per-bin counts, accuracy and mean confidence of the top label (bins ``(start, end]``).

    Returns a dict with ``edges`` (n_bins+1,), ``count``, ``acc``, ``conf`` (n_bins,) float64
    tensors; ``acc``/``conf`` are 0 for empty bins.
    """
    probs, labels = _check(probs, labels, n_bins)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # (start, end]: index = number of edges strictly below conf, minus 1
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(conf))
    s_acc = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, correct)
    s_conf = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, idx, conf)
    safe = count.clamp_min(1)
    return {"edges": edges, "count": count, "acc": s_acc / safe, "conf": s_conf / safe}


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins, as a fraction in [0, 1].

    ECE = Σ_b (n_b / N) · |acc_b − conf_b| (Guo et al., 2017; Park & Kim, 2022 §9).
    """
    b = reliability_bins(probs, labels, n_bins)
    n = b["count"].sum()
    return float(((b["count"] / n) * (b["acc"] - b["conf"]).abs()).sum())


def _mean_iou(cm: torch.Tensor) -> float:
    """Mean over classes present in the labels (rows with a sample) of TP / (TP + FP + FN)."""
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    present = cm.sum(1) > 0
    if not bool(present.any()):
        return float("nan")
    iou = tp[present] / (tp + fp + fn)[present]
    return float(iou.mean())


def calibration_metrics(probs, labels, n_bins: int = 15, threshold: float = 0.9) -> Dict[str, float]:
    """All accuracy / calibration / uncertainty metrics of Park & Kim (2022), §9.

    Args:
        probs: (N, K) predicted probabilities (e.g. softmax of logits, or its mean over
            stochastic forward passes).
        labels: (N,) integer class labels.
        n_bins: number of equal-width ECE bins (the spec's reference uses 10; default 15).
        threshold: confidence threshold of the "-90" metrics (0.9).

    Returns a dict of floats:
        ``top1``, ``top5``: accuracy in percent (top5 uses min(5, K) labels);
        ``nll``: mean −log p_{n,y_n} (natural log; probabilities clamped at 1e-12);
        ``ece``, ``signed_ece``: fractions (signed ECE > 0 means over-confident);
        ``brier``: mean Σ_k (p_nk − 1[k = y_n])²;
        ``acc90``: accuracy (fraction) of samples with confidence > threshold (nan if none);
        ``unc90``: #(wrong ∧ conf ≤ threshold) / #wrong (nan if nothing is wrong);
        ``freq90``: fraction of samples with confidence > threshold;
        ``iou``, ``iou90``: mean per-class intersection over union (fractions) on all samples /
        on the confident ones, averaging only classes present in the (subset's) labels.
    """
    if not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    probs, labels = _check(probs, labels, n_bins)
    n, k = probs.shape
    conf, pred = probs.max(dim=1)
    correct = pred == labels
    top5 = probs.topk(min(5, k), dim=1).indices.eq(labels[:, None]).any(dim=1)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    nll = float(-(p_true.clamp_min(1e-12).log()).mean())
    onehot = torch.nn.functional.one_hot(labels, k).double()
    brier = float(((probs - onehot) ** 2).sum(1).mean())

    b = reliability_bins(probs, labels, n_bins)
    w = b["count"] / n
    ece = float((w * (b["acc"] - b["conf"]).abs()).sum())
    signed_ece = float((w * (b["conf"] - b["acc"])).sum())

    confident = conf > threshold
    wrong = ~correct
    cm = torch.zeros(k, k, dtype=torch.float64)
    cm.index_put_((labels, pred), torch.ones(n, dtype=torch.float64), accumulate=True)
    cm90 = torch.zeros(k, k, dtype=torch.float64)
    cm90.index_put_((labels[confident], pred[confident]),
                    torch.ones(int(confident.sum()), dtype=torch.float64), accumulate=True)
    n_conf = int(confident.sum())
    n_wrong = int(wrong.sum())
    return {
        "top1": 100.0 * float(correct.double().mean()),
        "top5": 100.0 * float(top5.double().mean()),
        "nll": nll,
        "ece": ece,
        "signed_ece": signed_ece,
        "brier": brier,
        "acc90": float(correct[confident].double().mean()) if n_conf else math.nan,
        "unc90": float((wrong & ~confident).sum()) / n_wrong if n_wrong else math.nan,
        "freq90": n_conf / n,
        "iou": _mean_iou(cm),
        "iou90": _mean_iou(cm90) if n_conf else math.nan,
    }


def plot_reliability_diagram(probs, labels, path, n_bins: int = 15, title: Optional[str] = None):
    """Save a reliability diagram (accuracy per confidence bin vs the diagonal, with the gap
    shaded and the confidence histogram n_b/N below) to ``path`` (PNG/PDF/SVG by suffix).

    Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017); Park & Kim (2022) §9.
    Returns the path.
    """
    plt = pyplot()

    b = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges = b["edges"].numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / n_bins
    count = b["count"].numpy()
    nonempty = count > 0
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.2, 5.2), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[nonempty], b["acc"].numpy()[nonempty], width=width, edgecolor="k",
           color="tab:blue", label="accuracy")
    gap_lo = b["acc"].numpy()[nonempty]
    gap = b["conf"].numpy()[nonempty] - gap_lo
    ax.bar(centres[nonempty], gap, bottom=gap_lo, width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"reliability (ECE {100 * ece:.2f} %)")
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centres, count / count.sum(), width=width, edgecolor="k", color="tab:gray")
    axh.set_xlabel("confidence")
    axh.set_ylabel("fraction")
    return save_figure(fig, path)
