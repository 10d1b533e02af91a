"""The ``grid`` grouping: MaxViT's grid attention, a sparse global partition of the token map.

"MaxViT: Multi-Axis Vision Transformer" (Tu, Talebi, Zhang, Yang, Milanfar, Bovik & Li, ECCV 2022), sec. 3.2,
"grid attention": the ``H x W`` map is cut by a fixed ``G x G`` grid into groups of ``G x G`` tokens, each
token of a group ``H / G`` (``W / G``) rows (columns) from the next, so every group spans the whole map and
attention inside it mixes globally.  Token ``(a, b)`` of group ``(i, j)`` is map position
``(a * H / G + i, b * W / G + j)``, the official code's ``grid_partition`` (``reshape(B, G, H/G, G, W/G, C)``
then ``permute(0, 2, 4, 1, 3, 5)``); its sibling, block attention, is the ``window`` grouping.

This is the partition of CrossFormer's long-distance attention (:mod:`vitlab.layers.dilated`, ``G`` there is
the group size as here), so the grouping *is* that one under MaxViT's name and argument (``grid_size``); one
implementation serves both papers.  As there, a map not larger than ``G`` is one group and a map that is not a
multiple of ``G`` is zero-padded at its bottom and right (the official code requires a multiple).
"""
from __future__ import annotations

from vitlab.layers.attn_parts import GROUPINGS
from vitlab.layers.dilated import DilatedGrouping, dilated_partition, dilated_reverse

__all__ = ["GridGrouping", "grid_partition", "grid_reverse"]

grid_partition = dilated_partition  # (B, G*ih, G*iw, C) -> (B*ih*iw, G*G, C): MaxViT's name for it
grid_reverse = dilated_reverse


@GROUPINGS.register("grid")
class GridGrouping(DilatedGrouping):
    """MaxViT's grid attention groups (see the module docstring): a ``grid_size x grid_size`` grid of
    tokens dilated over the whole map."""

    def __init__(self, grid_size: int = 7):
        if grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size}")
        super().__init__(group_size=grid_size)
        self.grid_size = grid_size

    def __repr__(self) -> str:
        return f"{self.name}(grid_size={self.grid_size})"
