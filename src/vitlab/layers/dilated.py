"""The ``dilated`` grouping: long-distance attention over groups of tokens sampled at a fixed interval.

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang, Yao, Chen, Lin, Cai,
He & Liu, ICLR 2022), sec. 3.2, long distance attention (LDA): on an ``S x S`` map the tokens whose
coordinates differ by multiples of the interval ``I = S / G`` form one group of ``G x G`` tokens, so
``I x I`` groups each span the whole map (the same partition as MaxViT's grid attention, Tu et al., ECCV
2022).  Token ``(a, b)`` of group ``(i, j)`` is map position ``(a * I + i, b * I + j)``, the official code's
``reshape(B, G, I, G, I, C).permute(0, 2, 4, 1, 3, 5)``.  A map not larger than ``G`` is one group (as the
official code turns LDA into SDA there); a map that is not a multiple of ``G`` is zero-padded at its bottom
and right to ``G * ceil(S / G)``, as the ``window`` grouping pads.  The partition is computed from the
layout of each call, so one module takes any map size.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from vitlab.layers.attn_parts import GROUPINGS, require_layout
from vitlab.layers.grouping import _Grouping

__all__ = ["DilatedGrouping", "dilated_geometry", "dilated_partition", "dilated_reverse"]


def dilated_geometry(hw: Tuple[int, int], group_size: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``(group (gh, gw), interval (ih, iw))`` of the dilated partition of an ``hw`` map."""
    group = tuple(min(s, group_size) for s in hw)
    return group, tuple(-(-s // g) for s, g in zip(hw, group))  # type: ignore[return-value]


def dilated_partition(x: torch.Tensor, group: Tuple[int, int], interval: Tuple[int, int]) -> torch.Tensor:
    """``(B, gh * ih, gw * iw, C)`` map -> ``(B * ih * iw, gh * gw, C)`` groups, batch-major, groups in raster
    order of their offset ``(i, j)``, tokens in raster order of ``(a, b)``."""
    b, _, _, c = x.shape
    (gh, gw), (ih, iw) = group, interval
    x = x.view(b, gh, ih, gw, iw, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * ih * iw, gh * gw, c)


def dilated_reverse(groups: torch.Tensor, group: Tuple[int, int], interval: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`dilated_partition`: ``(B * ih * iw, gh * gw, C)`` -> ``(B, gh * ih, gw * iw, C)``."""
    (gh, gw), (ih, iw) = group, interval
    c = groups.shape[-1]
    x = groups.view(-1, ih, iw, gh, gw, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, gh * ih, gw * iw, c)


@GROUPINGS.register("dilated")
class DilatedGrouping(_Grouping):
    """CrossFormer's long-distance attention groups (see the module docstring); ``group_size`` is ``G``."""

    takes_prefix = False

    def __init__(self, group_size: int = 7):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def setup(self, host) -> None:
        require_layout(host, self).hw  # a 2-D map is needed; the partition itself follows each call's layout

    def key_grid(self, layout):
        return dilated_geometry(layout.hw, self.group_size)[0], 0

    def inputs(self, host, x, layout):
        b, n, c = x.shape
        h, w = layout.hw
        group, interval = dilated_geometry((h, w), self.group_size)
        ph, pw = group[0] * interval[0] - h, group[1] * interval[1] - w
        x = x.view(b, h, w, c)
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        groups = dilated_partition(x, group, interval)
        return groups, groups, (b, h, w, group, interval)

    def outputs(self, host, y, state):
        b, h, w, group, interval = state
        return dilated_reverse(y, group, interval)[:, :h, :w].reshape(b, h * w, -1)
