"""LipsFormer's depthwise-convolution residual units, run at the start of a block."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from vitlab.layers.shortcut import ChannelScale

__all__ = ["DWConvUnit"]


class DWConvUnit(nn.Module):
    """``x + alpha * GELU(Conv1x1(GELU(DWConv7x7(x))))`` (``pointwise=True``, unit 1) or
    ``x + alpha * GELU(DWConv7x7(x))`` (unit 2), on the token map.

    From "LipsFormer: Introducing Lipschitz Continuity to Vision Transformers" (Qi et al.,
    ICLR 2023), spec section 6.  Works on ``(B, N, C)`` tokens with ``hw`` giving the map;
    ``num_prefix`` leading tokens (class tokens) pass through unchanged.
    """

    def __init__(self, dim: int, kernel_size: int = 7, pointwise: bool = False, alpha: float = 0.2,
                 drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath

        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.pw = nn.Conv2d(dim, dim, 1) if pointwise else None
        self.alpha = ChannelScale(dim, alpha)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
        prefix, t = x[:, :num_prefix], x[:, num_prefix:]
        b, n, c = t.shape
        fm = t.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        y = self.act(self.dw(fm))
        if self.pw is not None:
            y = self.act(self.pw(y))
        t = t + self.drop_path(self.alpha(y.flatten(2).transpose(1, 2)))
        return torch.cat([prefix, t], dim=1) if num_prefix else t
