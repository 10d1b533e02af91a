"""Position encodings: ``learned``, ``sincos`` (2-D sine-cosine, fixed) and ``none``."""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["POS_EMBEDS", "sincos_2d", "resample_pos_embed"]

POS_EMBEDS = ("learned", "sincos", "none")


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


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int],
                       num_prefix: int = 1, mode: str = "bicubic") -> torch.Tensor:
    """Interpolate a learned ``(1, P + H*W, C)`` table to a new grid (prefix rows kept), as the
    papers do for 384x384 fine-tuning; thin wrapper over timm's well-tested implementation."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix, interpolation=mode, antialias=True)
