"""Oversmoothing measures on token matrices and attention maps.

Wang et al., "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis:
From Theory to Practice" (ICLR 2022), §7 of ``shared/specs/anti_oversmoothing.md``.  With
X ∈ R^{N×D}: DC[X] = (1/N)11ᵀX (the mean token), HC[X] = X − DC[X].
"""
from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["dc_component", "hc_dc_ratio", "high_frequency_fraction", "dc_energy_share",
           "patch_uniformity", "token_spectrum", "attention_collapse", "low_pass_distance"]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() not in (2, 3):
        raise ValueError(f"expected tokens of shape (B, N, D) or (N, D), got {getattr(x, 'shape', x)}")
    x = x.detach().double()
    return x[None] if x.dim() == 2 else x


def dc_component(x: torch.Tensor) -> torch.Tensor:
    """DC[X]: every token replaced by the mean token (same shape as ``x``)."""
    return x.mean(dim=-2, keepdim=True).expand_as(x)


def _energies(x):
    x = _tokens(x)
    dc = x.mean(dim=-2, keepdim=True)
    e_dc = dc.pow(2).sum(dim=(-2, -1)) * x.shape[-2]  # ‖DC‖_F² per sample
    e_hc = (x - dc).pow(2).sum(dim=(-2, -1))
    return e_dc, e_hc


def hc_dc_ratio(x: torch.Tensor) -> float:
    """‖HC[X]‖_F / ‖DC[X]‖_F per sample, averaged over the batch (0 for identical tokens,
    ≈ √(N−1) for i.i.d. Gaussian tokens)."""
    e_dc, e_hc = _energies(x)
    return float((e_hc.sqrt() / e_dc.sqrt().clamp_min(1e-300)).mean())


def high_frequency_fraction(x: torch.Tensor) -> float:
    """‖HC[X]‖_F² / ‖X‖_F² ∈ [0, 1], averaged over the batch."""
    e_dc, e_hc = _energies(x)
    return float((e_hc / (e_hc + e_dc).clamp_min(1e-300)).mean())


def dc_energy_share(x: torch.Tensor) -> float:
    """Share of the token energy in the DC component, ‖DC[X]‖_F² / ‖X‖_F² (1 = fully smoothed)."""
    return 1.0 - high_frequency_fraction(x)


def patch_uniformity(x: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of distinct tokens of the same image,
    Σ_{i≠j} cos(x_i, x_j) / (N(N−1)), averaged over the batch (1 = all tokens parallel)."""
    x = _tokens(x)
    n = x.shape[-2]
    if n < 2:
        raise ValueError("patch uniformity needs at least 2 tokens")
    u = torch.nn.functional.normalize(x, dim=-1)
    s = u.sum(dim=-2)  # Σ_i u_i
    # Σ_{i,j} u_i·u_j = ‖Σ u_i‖²; subtract the diagonal Σ ‖u_i‖² (1, or 0 for zero tokens)
    diag = u.pow(2).sum(dim=(-2, -1))
    return float(((s.pow(2).sum(-1) - diag) / (n * (n - 1))).mean())


def token_spectrum(x: torch.Tensor) -> torch.Tensor:
    """1-D DFT amplitude along the token axis, averaged over channels and batch: a vector of
    length N//2 + 1 (frequencies 0 … π)."""
    x = _tokens(x)
    return torch.fft.rfft(x, dim=-2).abs().mean(dim=(0, 2))


def attention_collapse(maps: Sequence[torch.Tensor]) -> List[float]:
    """Cosine similarity between the attention maps of consecutive layers (same image, head,
    query; rows flattened), averaged over images, heads and queries.  ``maps`` is a list of
    (B, H, Nq, Nk) tensors of equal shape; returns len(maps) − 1 values."""
    out = []
    for a, b in zip(maps[:-1], maps[1:]):
        if a.shape != b.shape:
            out.append(float("nan"))
            continue
        out.append(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean()))
    return out


def low_pass_distance(probs: torch.Tensor) -> torch.Tensor:
    """‖A − 1/N‖_F per head (distance from the pure low-pass filter), averaged over the batch:
    a (heads,) tensor for (B, H, Nq, Nk) probabilities."""
    p = probs.detach().double()
    return (p - 1.0 / p.shape[-1]).pow(2).sum(dim=(-2, -1)).sqrt().mean(0)
