"""Gated positional self-attention (GPSA): the modifier ``gpsa`` and the projection ``qk_v``.

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli, Touvron, Leavitt,
Morcos, Biroli & Sagun, ICML 2021, sec. 3.1, eq. 5-6).  Each head mixes its content attention with a purely
positional one by a learned gate ``sigma(lambda_h)``::

    A_h = normalize((1 - sigma(lambda_h)) * softmax(Q_h K_h^T / sqrt(d)) + sigma(lambda_h) * softmax(v_pos,h . r_ij))

where ``r_ij = (dx, dy, dx^2 + dy^2)`` is the offset of key ``j`` from query ``i`` on the token grid (``dx``
along the columns, ``dy`` along the rows, key minus query) and ``v_pos,h`` a learned vector per head (``pos_proj``,
a ``3 -> heads`` affine map).  Its local init (sec. 3.1, "Adaptive attention span") makes head ``h`` of
``k x k = heads`` heads attend around one of the ``k x k`` offsets of a convolution kernel, sharper with
``locality_strength``: a soft convolution that the gate can release.

The modifier acts on the probabilities (it needs the matrix, and keeps ``record_attention`` seeing the gated map),
so it runs in any backbone whose attention groups are one 2-D grid of tokens that are both queries and keys
(global attention, unshifted windows, ...); prefix (class) tokens, which the paper adds only after the GPSA
blocks, have no position: their rows keep the content attention and they get no positional attention (vitlab's
extension).  It is refused, naming the reason, with linear cores, non-softmax rows, reduced or other keys,
shifted-window masks and grids that are not 2-D.  Tensors sit on the host under timm's names (``pos_proj``,
``gating_param``, the non-persistent ``rel_indices``); ``qk_v`` is timm's ``qk`` + ``v`` projection.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from vitlab.layers.attn_parts import MODIFIERS, PROJECTIONS
from vitlab.layers.cores import Core
from vitlab.layers.linear import Linear, linear
from vitlab.layers.modifiers import _Modifier
from vitlab.layers.projection import _Projection, split_heads
from vitlab.layers.rope import queries_are_keys

__all__ = ["GatedPositionalAttention", "QKVSplitProjection", "OffsetProjection", "relative_offsets",
           "local_init_"]


def relative_offsets(grid: Tuple[int, int]) -> torch.Tensor:
    """``(N, N, 3)`` for the ``N = h * w`` tokens of ``grid`` in raster order: ``[i, j] = (dx, dy, dx^2 + dy^2)``,
    the column and row offsets of key ``j`` from query ``i`` (timm's ``rel_indices``)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten().float(), cols.flatten().float()
    dx, dy = cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]
    return torch.stack([dx, dy, dx ** 2 + dy ** 2], dim=-1)


class OffsetProjection(nn.Module):
    """``v_pos``: an affine map of the 3 offset features to one score per head, ``weight (heads, 3)``, ``bias
    (heads,)`` (the keys of timm's ``nn.Linear(3, heads)``).  Not an ``nn.Linear`` on purpose: a backbone's
    Linear init would erase the local init, which is the point of the part."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, 3))
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return linear(offsets, self.weight, self.bias)


@torch.no_grad()
def local_init_(pos_proj: OffsetProjection, locality_strength: float = 1.0) -> None:
    """The paper's local init (timm's ``GPSA.local_init`` for ``pos_proj``): head ``p = a + k * b`` of the first
    ``k * k`` (``k = floor(sqrt(heads))``) scores ``-(dx^2 + dy^2) + 2 (b - c) dx + 2 (a - c) dy``, which peaks at
    the offset ``(b - c, a - c)`` around the kernel centre ``c``; other heads keep N(0, 0.02) weights; all weights
    times ``locality_strength``, bias 0."""
    nn.init.trunc_normal_(pos_proj.weight, std=0.02)
    nn.init.zeros_(pos_proj.bias)
    k = math.isqrt(pos_proj.weight.shape[0])
    centre = (k - 1) / 2 if k % 2 == 0 else k // 2
    for a in range(k):
        for b in range(k):
            pos_proj.weight[a + k * b] = torch.tensor([2.0 * (b - centre), 2.0 * (a - centre), -1.0])
    pos_proj.weight.mul_(locality_strength)


@PROJECTIONS.register("qk_v")
class QKVSplitProjection(_Projection):
    """A ``qk`` Linear for queries and keys and a ``v`` Linear for the values (ConViT's GPSA, d'Ascoli et al.,
    ICML 2021; names as timm's ``convit.GPSA``), so V can start at the identity (``ConVit``'s init)."""

    def __init__(self, qkv_bias: bool = True):
        self.qkv_bias = qkv_bias

    def setup(self, host) -> None:
        host.qk = Linear(host.dim, 2 * host.inner, bias=self.qkv_bias)
        host.v = Linear(host.dim, host.inner, bias=self.qkv_bias)

    def __call__(self, host, xq, xkv):
        h, d = host.num_heads, host.head_dim
        if xq is xkv:
            b, n, _ = xq.shape
            q, k = host.qk(xq).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # queries and keys from different tokens: the same weights, split
            (wq, wk), bias = host.qk.weight.chunk(2), host.qk.bias
            bq, bk = bias.chunk(2) if bias is not None else (None, None)
            q, k = split_heads(linear(xq, wq, bq), h), split_heads(linear(xkv, wk, bk), h)
        return q, k, split_heads(host.v(xkv), h)


@MODIFIERS.register("gpsa")
class GatedPositionalAttention(_Modifier):
    """Gated positional self-attention (see the module docstring).  ``locality_strength`` (alpha of the paper,
    sec. 3.1) sharpens the local init of ``pos_proj``; ``gating_param`` (lambda, one per head) starts at 1."""

    def __init__(self, locality_strength: float = 1.0):
        if not locality_strength > 0:
            raise ValueError(f"locality_strength must be > 0, got {locality_strength!r}")
        self.locality_strength = float(locality_strength)

    def _refuse(self, other, why: str) -> None:
        raise ValueError(f"modifier '{self.name}' cannot be combined with {other.kind} '{other.name}': {why}")

    def _check(self, host) -> Tuple[Tuple[int, int], int]:
        """The grid and prefix count of one attention group, or a one-line refusal naming what does not fit."""
        core, g = host.core, host.grouping
        if type(core).normalize is not Core.normalize:
            self._refuse(core, f"gpsa mixes two probability rows; {core.name}'s attention rows are not a softmax")
        if not getattr(host.projection, "keys_are_queries", True):
            self._refuse(host.projection, "it has fewer keys than queries; gpsa needs every query to be a key")
        if not queries_are_keys(host):
            self._refuse(g, "its queries are not the keys here, so a query has no offset to each key")
        if g.has_mask:
            self._refuse(g, "its shifted-window mask would not reach gpsa's positional attention")
        if g.same_geometry is not True:
            self._refuse(g, "its groups have several grids here; gpsa's offsets need one")
        if host.layout is None:  # NaViT: packed images of several sizes
            raise ValueError(f"modifier '{self.name}' needs attention groups on one 2-D token grid; this attention is "
                             "built without a token layout (packed sequences have no common grid)")
        grid, prefix = g.key_grid(host.layout)
        if g.takes_prefix and prefix and prefix != host.layout.num_prefix:  # RegionViT: one regional token per window
            self._refuse(g, f"its groups share out the {host.layout.num_prefix} prefix tokens, which also attend "
                            "among themselves on another grid")
        if grid is None or len(grid) != 2:
            raise ValueError(f"modifier '{self.name}' needs attention groups on a 2-D token grid (offsets dx, dy); "
                             f"grouping '{g.name}' gives groups on grid {grid}")
        return tuple(grid), prefix

    def setup(self, host) -> None:
        self.grid, self.prefix = self._check(host)
        host.pos_proj = OffsetProjection(host.num_heads)
        local_init_(host.pos_proj, self.locality_strength)
        host.gating_param = nn.Parameter(torch.ones(host.num_heads))
        host.register_buffer("rel_indices", relative_offsets(self.grid), persistent=False)

    def positional(self, host, heads: slice) -> torch.Tensor:
        """``softmax_j(v_pos,h . r_ij)`` of the grid tokens, ``(h, G, G)`` for the heads ``heads``."""
        scores = host.pos_proj(host.rel_indices.to(host.pos_proj.weight.dtype))
        return scores.permute(2, 0, 1)[heads].float().softmax(dim=-1)

    def on_probs(self, host, probs: torch.Tensor, heads: slice) -> torch.Tensor:
        p, n = self.prefix, self.prefix + self.grid[0] * self.grid[1]
        if probs.shape[-2:] != (n, n):
            raise ValueError(f"modifier '{self.name}' was built for attention groups of {p} prefix + {self.grid} grid "
                             f"tokens ({n}); got a {tuple(probs.shape[-2:])} map: build the model for this input size")
        pos = self.positional(host, heads).to(probs.dtype)
        gate = torch.sigmoid(host.gating_param[heads]).view(1, -1, 1, 1).to(probs.dtype)
        if p:  # prefix keys get no positional attention; prefix queries keep their content row
            pos = torch.cat([pos.new_zeros(*pos.shape[:-1], p), pos], dim=-1)
        mixed = (1.0 - gate) * probs[..., p:, :] + gate * pos
        mixed = torch.cat([probs[..., :p, :], mixed], dim=-2) if p else mixed
        return mixed / mixed.sum(dim=-1, keepdim=True)
