"""Fourier analysis of feature maps: relative log amplitude and feature-map variance.

Park & Kim, "How Do Vision Transformers Work?" (ICLR 2022), §4-§5 of
``shared/specs/how_vits_work.md``: MSAs act as low-pass filters (they lower the
high-frequency amplitude and the feature-map variance), Convs/MLPs as high-pass filters.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from vitlab.plotting import pyplot, save_figure

__all__ = ["log_amplitude_diagonal", "relative_log_amplitude", "high_frequency_amplitude",
           "feature_map_variance", "diagonal_frequencies", "plot_fourier", "plot_variance"]


def _check_map(feature: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(feature) or feature.dim() != 4:
        shape = tuple(feature.shape) if torch.is_tensor(feature) else type(feature).__name__
        raise ValueError(f"expected a feature map of shape (B, C, H, W), got {shape}")
    if feature.shape[-1] < 2 or feature.shape[-2] < 2:
        raise ValueError(f"the Fourier measure needs a spatial map of at least 2x2, got {tuple(feature.shape[-2:])}")
    return feature


def diagonal_frequencies(size: int, include_nyquist: bool = False) -> torch.Tensor:
    """Frequencies (radians, in [0, π]) of the diagonal entries: 2π·i/size, i = 0 … size//2 − 1
    (… size//2 with ``include_nyquist``)."""
    n = size // 2 + (1 if include_nyquist else 0)
    return torch.arange(n, dtype=torch.float64) * (2 * math.pi / size)


def log_amplitude_diagonal(feature: torch.Tensor, include_nyquist: bool = False, eps: float = 1e-6,
                           reduce: str = "mean") -> torch.Tensor:
    """``log(|FFT2(F)| + eps)`` averaged over batch and channels, read along the diagonal
    from the zero frequency towards the corner (spec §4 steps 1-4).

    With ``reduce="sum"`` the sum over batch and channels is returned instead (to accumulate
    over batches).  Computed in float64.
    """
    f = _check_map(feature).detach().double()
    h, w = f.shape[-2:]
    amp = torch.log(torch.fft.fft2(f).abs() + eps)  # (B, C, H, W)
    amp = amp.sum(dim=(0, 1)) if reduce == "sum" else amp.mean(dim=(0, 1))
    # unshifted index of frequency i along both axes is i (no roll needed: the diagonal
    # (H/2 + i, W/2 + i) of the shifted map is entry (i, i) of the unshifted one)
    n = min(h, w) // 2 + (1 if include_nyquist else 0)
    idx = torch.arange(n)
    return amp[idx % h, idx % w]


def relative_log_amplitude(feature: torch.Tensor, include_nyquist: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Δ(f) = A(f) − A(0) along the diagonal of the centred log-amplitude spectrum.

    ``feature`` is (B, C, H, W); returns a float64 vector of length H//2 (entry i at frequency
    2πi/H; the last entry is the "high-frequency component" Δ(π) of the paper's plots).
    ``include_nyquist=True`` appends the corner (exactly π), which the reference omits.
    Reference values: white noise ≈ +0.35, a constant 14x14 map −19.09.
    """
    a = log_amplitude_diagonal(feature, include_nyquist, eps)
    return a - a[0]


def high_frequency_amplitude(feature: torch.Tensor, include_nyquist: bool = False) -> float:
    """The last entry Δ(π) of :func:`relative_log_amplitude`."""
    return float(relative_log_amplitude(feature, include_nyquist)[-1])


def feature_map_variance(feature: torch.Tensor) -> float:
    """Unbiased variance over spatial positions per sample and channel, averaged over batch
    and channels (spec §5)."""
    if not torch.is_tensor(feature) or feature.dim() != 4:
        raise ValueError(f"expected a feature map of shape (B, C, H, W), got {getattr(feature, 'shape', feature)}")
    f = feature.detach().double().flatten(2)
    if f.shape[-1] < 2:
        raise ValueError("feature-map variance needs at least 2 spatial positions")
    return float(f.var(dim=-1, unbiased=True).mean())


def _shade(ax, depth: List[float], kinds: List[str]):
    if len(depth) < 2:
        return
    step = depth[1] - depth[0]
    for d, k in zip(depth, kinds):
        if k == "attn":
            ax.axvspan(d - step / 2, d + step / 2, color="tab:gray", alpha=0.12, lw=0)
        elif k == "downsample":
            ax.axvspan(d - step / 2, d + step / 2, color="tab:orange", alpha=0.15, lw=0)


def plot_fourier(results: Dict[str, Dict], path, title: Optional[str] = None):
    """Two panels: Δ(f) curves coloured by depth (first model) and Δ(π) vs normalised depth
    (all models overlaid; attention blocks shaded).  ``results[name]`` is the dict produced by
    :func:`vitlab.analysis.features.feature_statistics`."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    first = next(iter(results.values()))
    cmap = plt.get_cmap("plasma")
    for curve, d in zip(first["fourier_curve"], first["depth"]):
        if curve is None:
            continue
        freqs = [i / (len(curve)) for i in range(len(curve))]
        ax1.plot(freqs, curve, color=cmap(d), lw=1)
    ax1.set_xlabel("frequency (×π)")
    ax1.set_ylabel("Δ log amplitude")
    ax1.set_title(f"{next(iter(results))}: Δ(f) by depth")
    for name, r in results.items():
        xs = [d for d, v in zip(r["depth"], r["high_freq"]) if v is not None]
        ys = [v for v in r["high_freq"] if v is not None]
        ax2.plot(xs, ys, marker="o", ms=3, label=name)
    _shade(ax2, first["depth"], first["kinds"])
    ax2.set_xlabel("normalised depth")
    ax2.set_ylabel("Δ log amplitude at high frequency")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_variance(results: Dict[str, Dict], path, key: str = "variance", ylabel: str = "feature map variance",
                  log: bool = True):
    """A per-block quantity vs normalised depth, one line per model, attention blocks shaded."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, r in results.items():
        xs = [d for d, v in zip(r["depth"], r[key]) if v is not None]
        ys = [v for v in r[key] if v is not None]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    first = next(iter(results.values()))
    _shade(ax, first["depth"], first["kinds"])
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("normalised depth")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
