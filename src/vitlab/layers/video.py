"""Parts for volumes and video: the tubelet stem, n-D sin-cos position codes and axial grouping.

* :class:`TubeletEmbed`: non-overlapping ``t x p x p`` tubelets, each projected linearly (a strided
  ``Conv3d``): "ViViT: A Video Vision Transformer" (Arnab et al., ICCV 2021, sec. 3.2, "tubelet
  embedding"); with ``t = 1`` it is the per-frame patch embedding, on a single-frame volume ViT's.
* :func:`sincos_nd`: the fixed sine-cosine code of any grid rank, the channels split evenly between the
  axes (for a 2-D grid it is :func:`vitlab.layers.pos_embed.sincos_2d`).
* grouping ``axial``: tokens attend only along some axes of the grid; tokens sharing their coordinates on
  the other axes form a group.  ViViT's factorised self-attention (sec. 3.3, model 3) is a spatial
  ``axes=(1, 2)`` then a temporal ``axes=(0,)`` attention over a ``(T, H, W)`` grid; on images,
  ``axes=(0,)`` / ``(1,)`` is column / row attention ("Axial Attention in Multidimensional
  Transformers", Ho et al., 2019).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn

from vitlab.layers.attn_parts import GROUPINGS, require_layout
from vitlab.layers.grouping import _Grouping

__all__ = ["TubeletEmbed", "check_video", "sincos_nd", "AxialGrouping"]


def check_video(x: torch.Tensor, in_chans: int, num_frames: int, img_size) -> None:
    """A one-line error unless ``x`` is a ``(B, in_chans, num_frames, H, W)`` batch with ``(H, W) == img_size``."""
    want = (in_chans, num_frames, *img_size)
    if x.ndim != 5 or tuple(x.shape[1:]) != want:
        raise ValueError(f"expected a video batch (B, C, T, H, W) = (B, {', '.join(map(str, want))}), got "
                         f"{tuple(x.shape)}")


class TubeletEmbed(nn.Module):
    """``(B, C, T, H, W)`` -> ``(B, T' H' W', dim)`` tokens in raster order (time slowest); ``grid_size`` is
    ``(T', H', W') = (T / t, H / p, W / p)``.  The projection is ``proj`` (a ``Conv3d``)."""

    def __init__(self, img_size: int = 224, num_frames: int = 16, patch_size: int = 16, tubelet_size: int = 2,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        for what, size, step in (("num_frames", num_frames, tubelet_size), ("img_size", img_size, patch_size)):
            if step < 1 or size % step:
                raise ValueError(f"{what}={size} must be a positive multiple of {step} (tubelet {tubelet_size} "
                                 f"x patch {patch_size})")
        self.img_size, self.num_frames = (img_size, img_size), num_frames
        self.patch_size, self.tubelet_size, self.in_chans = (patch_size, patch_size), tubelet_size, in_chans
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid_size)
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel, stride=kernel)

    def check(self, x: torch.Tensor) -> None:
        check_video(x, self.in_chans, self.num_frames, self.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_nd(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sine-cosine code ``(prod(grid), dim)`` in raster order: ``dim / rank`` channels per axis, the
    last axis first, each ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = temperature ** (-i /
    (dim / 2 rank))``, as MAE's 2-D code (equal to ``sincos_2d`` on a 2-D grid)."""
    rank = len(grid)
    if dim % (2 * rank):
        raise ValueError(f"a {rank}-D sin-cos code needs dim divisible by {2 * rank}, got {dim}")
    quarter = dim // (2 * rank)
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    parts = []
    for c in reversed(coords):  # x (the last axis) first, as sincos_2d
        angle = c.flatten()[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


@GROUPINGS.register("axial")
class AxialGrouping(_Grouping):
    """Attention along the grid axes ``axes`` only (see the module docstring).  Every group has the same
    shape and grid (heads can be mixed, a relative table would fit); prefix tokens are refused (ViViT's
    factorised self-attention has no class token: the model pools by averaging)."""

    takes_prefix = False

    def __init__(self, axes: Sequence[int] = (0,)):
        self.axes = tuple(int(a) for a in axes)
        if not self.axes or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes must be distinct grid axes, got {axes!r}")

    def setup(self, host) -> None:
        grid = tuple(require_layout(host, self).grid)
        if any(not 0 <= a < len(grid) for a in self.axes):
            raise ValueError(f"axes {self.axes} out of range for a {len(grid)}-D grid {grid}")
        self.grid = grid
        others = tuple(a for a in range(len(grid)) if a not in self.axes)
        self._order = others + self.axes  # group axes first, attended axes last
        self._inverse = tuple(self._order.index(a) for a in range(len(grid)))

    def key_grid(self, layout) -> Tuple[Tuple[int, ...], int]:
        return tuple(self.grid[a] for a in self.axes), 0

    def inputs(self, host, x, layout):
        if tuple(layout.grid) != self.grid:
            raise ValueError(f"axial attention was built for a {self.grid} grid, got {layout.grid}")
        b, _, c = x.shape
        g = x.view(b, *self.grid, c).permute(0, *(a + 1 for a in self._order), len(self.grid) + 1)
        g = g.reshape(-1, math.prod(self.grid[a] for a in self.axes), c)
        return g, g, b

    def outputs(self, host, y, b):
        shape = [self.grid[a] for a in self._order]
        y = y.reshape(b, *shape, y.shape[-1]).permute(0, *(a + 1 for a in self._inverse), len(shape) + 1)
        return y.reshape(b, math.prod(self.grid), -1)
