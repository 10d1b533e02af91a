"""Axial rotary position embedding (``position=("rope",)``): a position part that rotates q and k.

RoPE ("RoFormer: Enhanced Transformer with Rotary Position Embedding", Su et al., 2021, sec. 3.2) turns the
``d/2`` channel pairs of q and k by angles proportional to the token's position, so ``q_m . k_n`` depends on
``m - n`` only.  The axial 2-D form ("Rotary Position Embedding for Vision Transformer", Heo, Park, Han & Yun,
ECCV 2024, sec. 3.2, "RoPE-Axial"; timm's ``RotaryEmbedding``) gives the first ``d/4`` pairs the column
(x) and the next ``d/4`` the row (y), frequencies ``theta ** (-t / (d/4))`` with ``theta = 100``.  Here any
grid rank works: the pairs are split evenly over the axes, last axis (x) first.  Prefix (class) tokens are
not rotated (Heo et al.).  The part has no tensors, so it adds no state-dict keys.

Coordinates are those of each attention group's own grid (the grouping's ``Branch.grid``), counted from 0 in
the group: the whole map for global attention; the position inside the window for windows (Swin, NesT,
MaxViT's block attention, AlterNet; after Swin's cyclic shift every pair that the shift mask lets attend lies
in one contiguous region, so its offset is the true one), inside the stripe (CSwin) or inside the region's
window (RegionViT's local tokens; its regional token is a prefix token); the index inside the group for dilated
groups (MaxViT's grid attention, CrossFormer's long-distance groups: offsets in units of the dilation) and
for MobileViT's unfolded groups (one token per patch: the patch's position); the attended axes for
factorised video attention.  Any family takes it through ``attn_position``
(:class:`~vitlab.layers.mixers.MixerSpec`); it is refused where a query is not also a key
(:func:`queries_are_keys`: spatially reduced keys as PVT's and Twins' global attention, LeViT's subsampling,
class-token queries; CvT's strided keys and memory tokens are refused by their projections) and with cores
that never form the token-token matrix (linear attention) or attend over channels (XCiT).

Two options give EVA's form ("EVA-02: A Visual Representation for Neon Genesis", Fang, Sun, Wang, Huang, Wang &
Cao, 2023, sec. 2; timm's ``RotaryEmbeddingCat`` with ``in_pixels=False``, used by timm's ``Eva``):
``rope_order="yx"`` gives the first pairs to the first grid axis (rows, y) and ``rope_ref_grid=(h, w)`` rescales
each coordinate ``c`` of a ``g``-token axis to ``c / g * ref`` (positions in units of the reference grid the model
was trained on).  The frequencies ``theta ** (-t / (d/4))`` are timm's with ``rope_theta=10000``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch

from vitlab.layers.attn_parts import POSITION_BIASES
from vitlab.layers.position_bias import _Position

__all__ = ["AxialRoPE", "axial_angles", "rotate_pairs", "queries_are_keys"]


def queries_are_keys(host) -> bool:
    """Whether each query token is also a key (global attention, windows, stripes): not so for class-token
    queries (CaiT's class attention) or spatially reduced keys (PVT; the grouping registers ``sr`` on the host)."""
    g = host.grouping  # keys_are_queries: False for subsampled queries (LeViT) too
    return not g.queries_prefix_only and g.keys_are_queries and getattr(host, "sr", None) is None


def _group_rank(host) -> int:
    """Rank of one attention group's grid as built (axial video attention: the attended axes; default 2-D)."""
    grid = host.grouping.key_grid(host.layout)[0] if host.layout is not None else None
    return len(grid) if grid is not None else 2


def axial_angles(grid: Tuple[int, ...], head_dim: int, theta: float = 100.0, order: str = "xy",
                 ref_grid: Optional[Tuple[float, ...]] = None) -> torch.Tensor:
    """``(prod(grid), head_dim // 2)`` rotation angles of the grid tokens in raster order: pair block ``a``
    (``head_dim / (2 * rank)`` pairs) rotates with the coordinate along axis ``rank - 1 - a`` (``order="xy"``)
    or axis ``a`` (``order="yx"``); with ``ref_grid`` the coordinate ``c`` along axis ``i`` is
    ``c / grid[i] * ref_grid[i]`` (EVA-02's resizing, timm's ``ref_feat_shape``)."""
    rank = len(grid)
    per_axis = head_dim // (2 * rank)
    freqs = theta ** (-torch.arange(per_axis, dtype=torch.float32) / per_axis)
    axes = [torch.arange(g, dtype=torch.float32) for g in grid]
    if ref_grid is not None:  # in the operation order of timm's _build_grid (same float rounding)
        axes = [c / g * r for c, g, r in zip(axes, grid, ref_grid)]
    coords = torch.meshgrid(*axes, indexing="ij")
    order_axes = range(rank) if order == "yx" else reversed(range(rank))
    return torch.cat([coords[axis].reshape(-1, 1) * freqs for axis in order_axes], dim=1)


def rotate_pairs(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs ``(t[2i], t[2i+1])`` of ``t (..., N, d)`` by ``angles (N, d/2)``."""
    cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
    a, b = t.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


@POSITION_BIASES.register("rope")
class AxialRoPE(_Position):
    """Axial RoPE on the grid tokens of every attention group (see the module docstring); ``rope_theta`` is the
    frequency base (100 in Heo et al.; timm's ``RotaryEmbedding`` uses 10000 with another spacing),
    ``rope_order`` ``"xy"`` (x pairs first) or ``"yx"`` (grid-axis order: y first, EVA/timm ``Eva``),
    ``rope_ref_grid`` an int or one size per grid axis to rescale coordinates to (None: token indices).
    ``rope_registers = R`` also rotates the last ``R`` prefix tokens (the register tokens) on their own
    ``sqrt(R) x sqrt(R)`` grid with base ``rope_register_theta`` ("ViT-5: Vision Transformers for The
    Mid-2020s", Wang et al., 2026, sec. 3: high-frequency RoPE for registers; official ``rope_reg``, base 100)."""

    def __init__(self, rope_theta: float = 100.0, rope_order: str = "xy",
                 rope_ref_grid: Union[None, float, Sequence[float]] = None, rope_registers: int = 0,
                 rope_register_theta: float = 100.0):
        if rope_theta <= 1.0:
            raise ValueError(f"rope_theta must be > 1, got {rope_theta}")
        if rope_order not in ("xy", "yx"):
            raise ValueError(f"rope_order must be 'xy' (last axis first) or 'yx' (first axis first), "
                             f"got {rope_order!r}")
        ref = (rope_ref_grid,) if isinstance(rope_ref_grid, (int, float)) else rope_ref_grid
        if ref is not None and (not ref or any(not isinstance(r, (int, float)) or r <= 0 for r in ref)):
            raise ValueError(f"rope_ref_grid must be a positive size or one per grid axis, got {rope_ref_grid!r}")
        side = round(max(rope_registers, 0) ** 0.5)  # a negative count would give a complex root
        if rope_registers < 0 or side * side != rope_registers:
            raise ValueError(f"rope_registers must be a square number of register tokens (0, 1, 4, 9, ...), "
                             f"got {rope_registers}")
        if rope_register_theta <= 1.0:
            raise ValueError(f"rope_register_theta must be > 1, got {rope_register_theta}")
        self.registers, self.register_theta = (side, side) if rope_registers else None, float(rope_register_theta)
        self.theta, self.order = float(rope_theta), rope_order
        self.ref_grid = None if ref is None else tuple(float(r) for r in ref)

    def setup(self, host) -> None:
        if not getattr(host.core, "token_modifiers", True):  # q . k summed over tokens: no token offset left
            raise ValueError(f"position bias 'rope' cannot be combined with core '{host.core.name}': it attends "
                             "over channels (a d x d map per head); rope acts on the attention between tokens")
        if not host.core.forms_matrix:  # a kernel feature map is not rotation-equivariant (and stays >= 0)
            raise ValueError(f"position bias 'rope' cannot be combined with core '{host.core.name}': it rotates q "
                             "and k, which a linear-attention feature map does not preserve")
        if not queries_are_keys(host):
            raise ValueError(f"position bias 'rope' cannot be combined with grouping '{host.grouping.name}' here: "
                             "its queries are not the keys, so q and k have no common positions")
        rank = _group_rank(host)
        if host.head_dim % (2 * rank):
            raise ValueError(f"rope needs head_dim divisible by {2 * rank} on a {rank}-D grid, got {host.head_dim}")
        if self.ref_grid is not None and len(self.ref_grid) not in (1, rank):
            raise ValueError(f"rope_ref_grid {self.ref_grid} must give one size or one per axis of the {rank}-D grid")
        if self.registers is not None and rank != 2:
            raise ValueError(f"rope_registers rotates registers on a 2-D grid; these attention groups are {rank}-D")

    def on_qk(self, host, branch):
        """The branch with its grid tokens' q and k rotated (prefix tokens kept)."""
        if branch.grid is None:
            raise ValueError("rope needs the grid of each attention group; this grouping gives none")
        if len(branch.grid) != _group_rank(host):  # NaViT's packed rows: a 1-D sequence, not an image grid
            raise ValueError(f"position bias 'rope' was built for groups on a {_group_rank(host)}-D grid; these tokens "
                             f"lie on a {len(branch.grid)}-D grid {tuple(branch.grid)} (packed sequences have no common "
                             "image grid): pass the images as one (B, C, H, W) batch")
        ref = self.ref_grid * len(branch.grid) if self.ref_grid is not None and len(self.ref_grid) == 1 \
            else self.ref_grid
        angles = axial_angles(branch.grid, host.head_dim, self.theta, self.order, ref).to(branch.q.device)
        p, r = branch.num_prefix, 0
        if self.registers is not None:  # the registers' own grid, rescaled like the patches' (the official code's)
            r = self.registers[0] ** 2
            if p < r:
                raise ValueError(f"rope_registers={r} needs {r} register tokens in every attention group; this group "
                                 f"has {p} prefix tokens (registers join global attention only)")
            reg_ref = self.registers if self.ref_grid is not None else None
            reg = axial_angles(self.registers, host.head_dim, self.register_theta, self.order, reg_ref)
            angles = torch.cat([reg.to(angles.device), angles])

        def rot(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[..., :p - r, :], rotate_pairs(t[..., p - r:, :], angles)], dim=-2) if p - r else \
                rotate_pairs(t, angles)

        return dataclasses.replace(branch, q=rot(branch.q), k=rot(branch.k))
