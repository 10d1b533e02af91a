"""Conditional position codes (:data:`POS_CODES`): position information generated from the tokens' own
neighbourhood instead of a table of fixed size.

* ``peg``: the positional encoding generator of "Conditional Positional Encodings for Vision Transformers"
  (Chu, Tian, Zhang, Wang, Xia & Shen, 2021, sec. 3): ``x + DWConv_kxk(x)`` on the token map, zero
  padding giving the absolute position; used by CPVT and Twins ("Twins: Revisiting the Design of Spatial
  Attention in Vision Transformers", Chu et al., NeurIPS 2021, sec. 2.1).

A position code is called as ``code(x (B, N, C), layout) -> (B, N, C)`` and works on any 2-D token map of
any size; a staged :class:`~vitlab.models.backbone.Stage` runs it after one of its blocks (``pos_block``).
"""
from __future__ import annotations

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.registry import Registry

__all__ = ["POS_CODES", "PEG", "create_pos_code"]

POS_CODES = Registry("position code")


@POS_CODES.register("peg")
class PEG(nn.Module):
    """``x + DWConv(x)``: a ``kernel x kernel`` depthwise conv (with bias) on the ``(B, C, H, W)`` token map,
    added to the tokens (Chu et al., 2021, sec. 3; timm's ``PosConv``, whose keys ``proj.0.*`` these are).
    Prefix (class) tokens pass unchanged, as in CPVT.  ``stride > 1`` gives the strided variant without
    the residual (the map shrinks)."""

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1 or stride < 1:
            raise ValueError(f"a PEG needs an odd kernel_size >= 1 and stride >= 1, got kernel_size={kernel_size}, "
                             f"stride={stride}")
        self.stride = stride
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim))

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        fm = layout.to_map(x)
        y = self.proj(fm)
        if self.stride == 1:  # the generator adds position information to the tokens it read
            y = y + fm
        p = layout.num_prefix
        return torch.cat([x[:, :p], y.flatten(2).transpose(1, 2)], dim=1) if p else y.flatten(2).transpose(1, 2)


def create_pos_code(name: str, dim: int, **kwargs) -> nn.Module:
    """A position code by name (``peg``); ``kwargs`` are its options (``kernel_size``, ``stride``)."""
    return POS_CODES.build(name, dim, **kwargs)
