"""Unfold / fold of a token map into patch positions, and the ``unfold`` grouping built on it.

"MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer" (Mehta and Rastegari,
ICLR 2022, sec. 3.1, Fig. 1b): a ``(H, W)`` map is cut into ``N = (H / ph) * (W / pw)`` non-overlapping
``ph x pw`` patches, and the transformer runs once per position ``p`` inside the patch, over the ``N``
pixels that sit at ``p`` in every patch ("unfold"); "fold" puts them back.  As a grouping this is
attention among the tokens at stride ``(ph, pw)`` (the dilated groups of CrossFormer's long-distance
attention and of MaxViT's grid attention have the same shape); only attention sees the groups, so the
norms and MLP of a block run on the tokens in map order unchanged.

Orders are the official code's (and timm's): group ``b * P + p`` with ``p = a * pw + c`` for the pixel
``(a, c)`` of a patch, and inside a group the patches in raster order ``i * (W / pw) + j``.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

from vitlab.layers.attn_parts import GROUPINGS
from vitlab.layers.dilated import dilated_partition, dilated_reverse
from vitlab.layers.grouping import _Grouping
from vitlab.layers.layout import TokenLayout

__all__ = ["unfold_patches", "fold_patches", "UnfoldGrouping", "patch_pair"]

Pair = Tuple[int, int]


def patch_pair(patch_size: Union[int, Tuple[int, int]]) -> Pair:
    """``patch_size`` as ``(ph, pw)``, both positive."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    return int(ph), int(pw)


def _check(hw: Pair, patch: Pair) -> None:
    if hw[0] % patch[0] or hw[1] % patch[1]:
        raise ValueError(f"a {hw[0]}x{hw[1]} map cannot be unfolded into {patch[0]}x{patch[1]} patches; resize it to "
                         "a multiple of the patch first (MobileViT's block resizes bilinearly)")


def unfold_patches(x: torch.Tensor, hw: Pair, patch: Pair) -> torch.Tensor:
    """``(B, H*W, C)`` tokens in raster order -> ``(B * ph * pw, N, C)``: row ``b * P + p`` holds the ``N``
    tokens at position ``p`` of every ``ph x pw`` patch of image ``b``, patches in raster order (the dilated
    partition with the patch as its interval)."""
    _check(hw, patch)
    (h, w), (ph, pw) = hw, patch
    return dilated_partition(x.reshape(x.shape[0], h, w, x.shape[-1]), (h // ph, w // pw), (ph, pw))


def fold_patches(y: torch.Tensor, hw: Pair, patch: Pair) -> torch.Tensor:
    """Inverse of :func:`unfold_patches`: ``(B * ph * pw, N, C)`` -> ``(B, H*W, C)``."""
    _check(hw, patch)
    (h, w), (ph, pw) = hw, patch
    return dilated_reverse(y, (h // ph, w // pw), (ph, pw)).reshape(-1, h * w, y.shape[-1])


@GROUPINGS.register("unfold")
class UnfoldGrouping(_Grouping):
    """Attention among the tokens at the same position of every ``patch_size`` patch (MobileViT, Mehta and
    Rastegari, ICLR 2022, sec. 3.1; see the module docstring).  Every group has the ``(H / ph, W / pw)`` grid
    of the patches; the map must be a multiple of the patch (read from the layout at each call)."""

    takes_prefix = False

    def __init__(self, patch_size: Union[int, Tuple[int, int]] = 2):
        self.patch_size = patch_pair(patch_size)

    def key_grid(self, layout: TokenLayout):
        if layout is None:
            return None, 0
        (h, w), (ph, pw) = layout.hw, self.patch_size
        return (h // ph, w // pw), 0

    def inputs(self, host, x, layout):
        if layout is None or layout.num_prefix:
            raise ValueError("grouping 'unfold' needs the 2-D layout of a map without prefix tokens")
        groups = unfold_patches(x, layout.hw, self.patch_size)
        return groups, groups, layout.hw

    def outputs(self, host, y, state):
        return fold_patches(y, state, self.patch_size)
