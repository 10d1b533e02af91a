"""Residual shortcut parts, selectable by name: ``plain``, ``weighted``, ``layerscale``.

A shortcut here is the scale applied to a branch before it is added back:
``x + DropPath(shortcut(F(x)))``.  ``plain`` is the identity; ``weighted`` and ``layerscale``
are both a learnable per-channel vector, differing in their paper and default init.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitlab.registry import Registry

__all__ = ["SHORTCUTS", "ChannelScale", "create_shortcut"]

SHORTCUTS = Registry("shortcut")


class ChannelScale(nn.Module):
    """Learnable per-channel scale of a residual branch, ``y = gamma * F(x)``.

    As ``layerscale`` it is LayerScale from "Going deeper with Image Transformers" (Touvron
    et al., ICCV 2021; CaiT), init 1e-5 or 1e-6.  As ``weighted`` it is the weighted residual
    shortcut ``x + alpha * F(x)`` of "LipsFormer" (Qi et al., ICLR 2023), init 1/L for a
    network of L blocks.  The parameter is called ``gamma`` (timm's LayerScale name).
    """

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"{self.gamma.numel()}, init_value={self.init_value:g}"


@SHORTCUTS.register("plain")
def _plain(dim: int, init_value: Optional[float] = None, depth: int = 1) -> nn.Module:
    return nn.Identity()


@SHORTCUTS.register("weighted")
def _weighted(dim: int, init_value: Optional[float] = None, depth: int = 1) -> nn.Module:
    return ChannelScale(dim, 1.0 / depth if init_value is None else init_value)


@SHORTCUTS.register("layerscale")
def _layerscale(dim: int, init_value: Optional[float] = None, depth: int = 1) -> nn.Module:
    return ChannelScale(dim, 1e-5 if init_value is None else init_value)


def create_shortcut(name: str, dim: int, init_value: Optional[float] = None, depth: int = 1) -> nn.Module:
    """Build a branch scale by name. ``depth`` is the network's total block count (the
    weighted shortcut's default init is ``1/depth``)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return SHORTCUTS.get(name)(dim, init_value=init_value, depth=depth)
