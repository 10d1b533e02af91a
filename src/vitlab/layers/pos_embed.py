"""Position encodings: ``learned``, ``sincos`` (2-D sine-cosine, fixed), ``sincos_1d`` (1-D, fixed) and ``none``."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["POS_EMBEDS", "sincos_1d", "sincos_2d", "sincos_2d_big_vision", "sincos_nd_big_vision", "resample_pos_embed"]

POS_EMBEDS = ("learned", "sincos", "sincos_1d", "sincos_big_vision", "none")


def sincos_1d(n: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 1-D sinusoid table ``(n, dim)`` of "Attention Is All You Need" (Vaswani et al., 2017, sec. 3.5):
    channel ``i`` of position ``p`` is ``sin`` (even ``i``) / ``cos`` (odd ``i``) of ``p / T**(2*(i//2)/dim)``,
    interleaved; the table of T2T-ViT (Yuan et al., ICCV 2021) and CCT's ``sine`` (Hassani et al., 2021)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    angle = pos / temperature ** (2 * (torch.arange(dim) // 2).double() / dim)
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())  # float64, then rounded once
    return table.float()


def sincos_2d(grid: Tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine encoding ``(H*W, dim)`` in raster order, as in MoCo v3 ("An
    Empirical Study of Training Self-Supervised Vision Transformers", Chen et al., 2021) and
    MAE: a quarter of the channels each for sin/cos of the x and y positions."""
    if dim % 4 != 0:
        raise ValueError(f"sincos position encoding needs dim divisible by 4, got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.flatten()[:, None] * omega[None]
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def sincos_2d_big_vision(grid: Tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """big_vision's ``posemb_sincos_2d`` ``(H*W, dim)``, the table of SimpleViT ("Better plain ViT baselines
    for ImageNet-1k", Beyer, Zhai & Kolesnikov, 2022, sec. 2): as :func:`sincos_2d` (``[sin x, cos x, sin y,
    cos y]``) but ``omega = T ** -(i / (dim/4 - 1))``, so the slowest frequency is exactly ``1/T``."""
    if dim % 4 != 0 or dim < 8:
        raise ValueError(f"big_vision sincos position encoding needs dim divisible by 4 and >= 8, got {dim}")
    return sincos_nd_big_vision(grid, dim, temperature)


def sincos_nd_big_vision(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """big_vision's sin-cos code ("Better plain ViT baselines for ImageNet-1k", Beyer, Zhai & Kolesnikov, 2022,
    sec. 2) on a grid of any rank, as vit-pytorch's ``simple_vit_3d``: ``f = dim // (2 rank)`` frequencies
    ``omega_i = T ** (-i / (f - 1))`` (the slowest exactly ``1/T``) per axis, ``[sin, cos]`` of the last axis first,
    then zero channels when ``2 rank`` does not divide ``dim``.  ``(prod(grid), dim)`` in raster order."""
    rank, f = len(grid), dim // (2 * len(grid))
    if f < 2:
        raise ValueError(f"a {rank}-D big_vision sin-cos code needs dim >= {4 * rank}, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(f, dtype=torch.float32) / (f - 1))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    angles = [c.flatten()[:, None] * omega[None] for c in reversed(coords)]  # x (the last axis) first
    code = torch.cat([t for a in angles for t in (a.sin(), a.cos())], dim=1)
    return torch.cat([code, code.new_zeros(code.shape[0], dim - code.shape[1])], dim=1)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int],
                       num_prefix: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Interpolate a learned ``(1, P + H*W, C)`` table to a new grid (prefix rows kept), as the
    papers do for 384x384 fine-tuning; thin wrapper over timm's well-tested implementation."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix, interpolation=mode, antialias=True)
