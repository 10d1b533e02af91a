"""The convolutional projection of CvT: q, k, v from a depthwise-convolved token map (DESIGN.md, "projection").

"CvT: Introducing Convolutions to Vision Transformers", Wu, Xiao, Codella, Liu, Dai, Yuan and Zhang, ICCV
2021, sec. 3.2 ("Convolutional Projection for Attention"): each of q, k, v is a depthwise ``k x k`` conv of
the token map, BatchNorm, then a pointwise Linear; the queries keep stride 1, keys and values use stride 2
("squeezed" convolutional projection), so the attention has ``(H/2) (W/2)`` keys.  Prefix (class) tokens skip
the conv and take the Linear only.  Names as the official code: ``conv_proj_{q,k,v}.{conv,bn}`` and
``proj_{q,k,v}`` on the attention module.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

import torch
from torch import nn

from vitlab.layers.attn_parts import PROJECTIONS
from vitlab.layers.inplace import conv_bn_act
from vitlab.layers.layout import TokenLayout, as_layout
from vitlab.layers.linear import Linear
from vitlab.layers.projection import _Projection, split_heads

__all__ = ["ConvProjection", "DepthwiseConvBN"]


class DepthwiseConvBN(nn.Module):
    """A depthwise ``kernel x kernel`` conv (no bias, padding ``kernel // 2``) then BatchNorm2d on a
    ``(B, C, H, W)`` map: one branch of CvT's convolutional projection (Wu et al., ICCV 2021, sec. 3.2)."""

    def __init__(self, dim: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, bias=False, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, fm: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(self.conv, self.bn, None, fm)  # without autograd: the BN folded into the conv


def _out_grid(grid: Tuple[int, ...], kernel: int, stride: int) -> Tuple[int, ...]:
    return tuple((g + 2 * (kernel // 2) - kernel) // stride + 1 for g in grid)


@PROJECTIONS.register("conv")
class ConvProjection(_Projection):
    """CvT's convolutional projection (Wu et al., ICCV 2021, sec. 3.2; see the module docstring): ``kernel_size``
    depthwise conv + BN, stride 1 for q and ``stride_kv`` for k and v, then the ``proj_{q,k,v}`` Linears.

    It reads the token map of each group (the whole map with global attention, each window with windows),
    so it needs query tokens on the map (no class-token queries) and heads not split after it (no stripes);
    with ``stride_kv > 1`` the keys lie on a coarser grid than the queries, so parts that need every query
    to be a key (a value-map term, a logit bias table, rotary positions, LSA's diagonal) are refused."""

    takes_layout = True  # MultiHeadAttention hands this projection the call's TokenLayout

    def __init__(self, kernel_size: int = 3, stride_kv: int = 2, qkv_bias: bool = True):
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if stride_kv < 1:
            raise ValueError(f"stride_kv must be >= 1, got {stride_kv}")
        self.kernel_size, self.stride_kv, self.qkv_bias = kernel_size, stride_kv, qkv_bias

    @property
    def keys_are_queries(self) -> bool:
        return self.stride_kv == 1

    def setup(self, host) -> None:
        self._refuse_parts(host)
        for t, stride in (("q", 1), ("k", self.stride_kv), ("v", self.stride_kv)):
            setattr(host, f"conv_proj_{t}", DepthwiseConvBN(host.dim, self.kernel_size, stride))
            setattr(host, f"proj_{t}", Linear(host.dim, host.inner, bias=self.qkv_bias))

    def _refuse_parts(self, host) -> None:
        """Setup runs after the grouping, core, modifiers and position parts are built: refuse what cannot hold."""
        g = host.grouping
        if g.queries_prefix_only:
            raise ValueError(f"projection 'conv' convolves the query map; grouping '{g.name}' asks with the prefix "
                             "tokens only")
        if hasattr(g, "stripes") and self.stride_kv > 1:  # stripes split q, k, v by the query grid after us
            raise ValueError(f"projection 'conv' with stride_kv={self.stride_kv} puts the keys on a coarser grid; "
                             f"grouping '{g.name}' cuts keys and queries into the same stripes (use stride_kv=1)")
        if self.keys_are_queries:
            return
        for p in (host.core, *host.modifiers, *host.positions):
            needs = (getattr(p, "value_map", False) or getattr(p, "logit_bias", False) or hasattr(p, "on_qk")
                     or p.name == "lsa" or getattr(p, "token_modifiers", True) is False)
            if needs:
                raise ValueError(f"projection 'conv' with stride_kv={self.stride_kv} has fewer keys than queries; "
                                 f"{p.kind} '{p.name}' needs every query to be a key (use stride_kv=1)")

    def _grids(self, host, xq, xkv, layout: Optional[TokenLayout]) -> Tuple[TokenLayout, TokenLayout]:
        """The layouts of the query tokens and the key/value tokens the grouping hands over."""
        if layout is None:  # a caller that passes no layout (a core's own fast path): the one built for
            layout = host.layout or as_layout(xkv.shape[1])
        grid, prefix = host.grouping.key_grid(layout)
        kv = as_layout(xkv.shape[1]) if grid is None else TokenLayout(grid, prefix)
        return (kv if xq is xkv else layout), kv

    @staticmethod
    def _branch(conv: nn.Module, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Prefix tokens unchanged, the grid tokens through ``conv`` on their map."""
        layout.check(x)
        p = layout.num_prefix
        return layout.from_map(conv(layout.to_map(x)), x[:, :p] if p else None)

    def __call__(self, host, xq, xkv, layout: Optional[TokenLayout] = None):
        lq, lkv = self._grids(host, xq, xkv, layout)
        h = host.num_heads
        q = host.proj_q(self._branch(host.conv_proj_q, xq, lq))
        k = host.proj_k(self._branch(host.conv_proj_k, xkv, lkv))
        v = host.proj_v(self._branch(host.conv_proj_v, xkv, lkv))
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)

    def key_grid(self, grid: Tuple[int, ...]) -> Tuple[int, ...]:
        """The grid of a group's keys after the strided conv, from the grid before it."""
        return _out_grid(grid, self.kernel_size, self.stride_kv)

    def on_branches(self, host, branches: List) -> List:
        """The branches with their keys' grid after the strided conv (what records and value terms read)."""
        if self.stride_kv == 1:
            return branches
        return [replace(b, grid=self.key_grid(b.grid)) if b.grid is not None else b for b in branches]
