"""Grouping parts: which tokens attend to which (DESIGN.md, "grouping").

A grouping may act on tokens before the projection (:meth:`inputs` / :meth:`outputs`: windows,
spatially reduced keys, class-token queries) and on split heads after it (:meth:`branches` /
:meth:`merge`: CSwin's stripes put half the heads in vertical and half in horizontal stripes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import GROUPINGS, AttentionPart, require_layout
from vitlab.layers.layout import TokenLayout, as_layout
from vitlab.layers.window import shift_window_mask, stripe_partition, stripe_reverse, window_partition, window_reverse

__all__ = ["Branch", "GlobalGrouping", "WindowGrouping", "StripeGrouping", "SpatialReduction", "ClassQuery"]


@dataclass
class Branch:
    """Heads ``heads`` of one attention call: ``q (B', h, Nq, d)``, ``k, v (B', h, Nk, d)``; ``grid`` is
    the grid of each group's key tokens (after ``num_prefix`` prefix keys).  ``keep`` is a mask that depends on
    the call, ``(G, Nq, Nk)`` booleans (True: attend) repeating over the ``B'`` groups, for the grouping's
    :meth:`_Grouping.with_mask` (RegionViT's padding masks); it rides on the branch, never on the grouping."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: slice
    grid: Optional[Tuple[int, ...]]
    num_prefix: int = 0
    index: int = 0
    keep: Optional[torch.Tensor] = None


class _Grouping(AttentionPart):
    kind = "grouping"
    same_shape = True
    same_geometry = True
    takes_prefix = True
    has_mask = False
    queries_prefix_only = False
    keys_are_queries = True
    shift_size: Tuple[int, ...] = (0, 0)  # groupings without a cyclic shift

    def inputs(self, host, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """Query tokens, key/value tokens and a state for :meth:`outputs` (default: all tokens)."""
        return x, x, None

    def outputs(self, host, y: torch.Tensor, state: Any) -> torch.Tensor:
        return y

    def key_grid(self, layout: TokenLayout) -> Tuple[Optional[Tuple[int, ...]], int]:
        """Grid and prefix count of the key tokens of one group (``None, 0``: unknown, square assumed)."""
        return (layout.grid, layout.num_prefix) if layout is not None else (None, 0)

    def branches(self, host, q, k, v, layout: TokenLayout, state: Any) -> List[Branch]:
        grid, prefix = self.key_grid(layout)
        return [Branch(q, k, v, slice(0, host.num_heads), grid, prefix)]

    def merge(self, host, outs: List[torch.Tensor], layout: TokenLayout, state: Any) -> torch.Tensor:
        """``(B', Nq, heads * d)`` from the branches' outputs ``(B', h, Nq, d)``."""
        o = outs[0]
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    def with_mask(self, host, bias: Optional[torch.Tensor], branch: Branch) -> Optional[torch.Tensor]:
        """The logit bias of ``branch`` (over ``branch.q.shape[0]`` groups), with this grouping's mask added
        (default: none)."""
        return bias


@GROUPINGS.register("global")
class GlobalGrouping(_Grouping):
    """Every token attends to every token (ViT, Dosovitskiy et al., ICLR 2021)."""


@GROUPINGS.register("window")
class WindowGrouping(_Grouping):
    """Non-overlapping ``window_size`` windows, optionally cyclically shifted by half a window
    ("Swin Transformer", Liu et al., ICCV 2021).  As in the official code, the window shrinks to the
    map (and the shift is dropped) when the map is not larger; maps that are not multiples of the
    window are zero-padded (as timm does).  ``fit_map=False`` keeps the window on a smaller map and
    zero-pads it too (Twins' locally-grouped attention, Chu et al., NeurIPS 2021, sec. 2.2, as its official
    code).  The shift mask is ``attn_mask`` on the host."""

    takes_prefix = False

    def __init__(self, window_size: int = 7, shift: bool = False, fit_map: bool = True):
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size, self.shift, self.fit_map = window_size, shift, fit_map

    def setup(self, host) -> None:
        h, w = require_layout(host, self).hw
        ws = tuple(min(r, self.window_size) if self.fit_map else self.window_size for r in (h, w))
        half = self.window_size // 2 if self.shift else 0
        self.window = ws
        self.shift_size = tuple(0 if r <= k else half for r, k in zip((h, w), ws))
        self.grid = (h, w)
        mask = None
        if any(self.shift_size):
            padded = tuple(-(-r // k) * k for r, k in zip((h, w), ws))
            mask = shift_window_mask(padded, ws, self.shift_size)
        self.has_mask = mask is not None
        host.register_buffer("attn_mask", mask, persistent=False)

    def key_grid(self, layout):
        return self.window, 0

    def inputs(self, host, x, layout):
        if tuple(layout.grid) != self.grid:
            raise ValueError(f"window attention was built for a {self.grid} map, got {layout.grid}")
        b, n, c = x.shape
        h, w = self.grid
        x = x.view(b, h, w, c)
        sh, sw = self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        ph, pw = (-h) % self.window[0], (-w) % self.window[1]
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        windows = window_partition(x, self.window)
        return windows, windows, (b, ph, pw)

    def outputs(self, host, y, state):
        b, ph, pw = state
        h, w = self.grid
        y = window_reverse(y, self.window, h + ph, w + pw)[:, :h, :w]
        if any(self.shift_size):
            y = torch.roll(y, shifts=self.shift_size, dims=(1, 2))
        return y.reshape(b, h * w, -1)

    def with_mask(self, host, bias, branch):
        """The shift mask ``(nW, n, n)`` plus ``bias`` ``(1, h, n, n)``, formed once and expanded to the
        ``rows = B * nW`` windows of the call (one materialisation, as the official code); a bias of one map per
        window, ``(rows, h, n, n)`` (it reads the queries: ``decomposed_relative``), gets each window's mask."""
        m = host.attn_mask
        if m is None:
            return bias
        rows = branch.q.shape[0]
        nw, n, _ = m.shape
        m = m.view(1, nw, 1, n, n).to(bias.dtype if bias is not None else m.dtype)
        if bias is not None and bias.shape[0] > 1:  # windows in batch-major order: row b * nW + w
            return (bias.reshape(rows // nw, nw, -1, n, n) + m).reshape(rows, -1, n, n)
        if bias is not None:
            m = m + bias.view(1, 1, -1, n, n)
        return m.expand(rows // nw, -1, -1, -1, -1).reshape(rows, -1, n, n)


def _to_stripes(t: torch.Tensor, hw: Tuple[int, int], stripe: Tuple[int, int]) -> torch.Tensor:
    """``(B, h, N, d)`` split heads -> ``(B * nS, h, S, d)`` stripes (channels head-major)."""
    b, nh, n, d = t.shape
    x = t.transpose(1, 2).reshape(b, hw[0], hw[1], nh * d)
    return stripe_partition(x, stripe).reshape(-1, stripe[0] * stripe[1], nh, d).transpose(1, 2)


def _from_stripes(t: torch.Tensor, hw: Tuple[int, int], stripe: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_stripes`, to ``(B, N, h * d)`` tokens."""
    bs, nh, s, d = t.shape
    x = stripe_reverse(t.transpose(1, 2).reshape(bs, s, nh * d), stripe, hw[0], hw[1])
    return x.reshape(x.shape[0], hw[0] * hw[1], nh * d)


@GROUPINGS.register("stripes")
class StripeGrouping(_Grouping):
    """Cross-shaped windows ("CSWin Transformer", Dong et al., CVPR 2022): heads ``[0, h/2)`` attend
    inside vertical stripes ``(H, sw)``, heads ``[h/2, h)`` inside horizontal ones ``(sw, W)``; a map
    that one stripe covers (or ``single=True``, CSwin's last stage) is one branch over the map."""

    takes_prefix = False
    same_shape = "if the map is square (set per map)"
    same_geometry = "if one branch covers the map (set per map)"

    def __init__(self, split_size: int = 7, single: bool = False):
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        self.split_size, self.single = split_size, single

    def setup(self, host) -> None:
        h, w = self.grid = require_layout(host, self).hw
        sw = self.split_size
        if self.single or (sw >= h and sw >= w):
            self.stripes = [(h, w)]
        else:
            if host.num_heads % 2:
                raise ValueError(f"cross-shaped attention splits the heads in two halves; num_heads="
                                 f"{host.num_heads} is odd (map {h}x{w})")
            sw = min(sw, h, w)
            if h % sw or w % sw:
                raise ValueError(f"a {h}x{w} map cannot be cut into stripes of width {sw}; choose split_size "
                                 f"dividing {h} and {w} (e.g. 12 for a 24x24 map at 384 input)")
            self.stripes = [(h, sw), (sw, w)]
        self.same_shape = len(self.stripes) == 1 or h == w
        self.same_geometry = len(self.stripes) == 1

    def branches(self, host, q, k, v, layout, state):
        hb = host.num_heads // len(self.stripes)
        out = []
        for i, stripe in enumerate(self.stripes):
            sl = slice(i * hb, (i + 1) * hb)
            qs, ks, vs = (_to_stripes(t[:, sl], self.grid, stripe) for t in (q, k, v))
            out.append(Branch(qs, ks, vs, sl, stripe, 0, i))
        return out

    def merge(self, host, outs, layout, state):
        merged = [_from_stripes(o, self.grid, s) for o, s in zip(outs, self.stripes)]
        return torch.cat(merged, dim=-1) if len(merged) > 1 else merged[0]


@GROUPINGS.register("spatial_reduction")
class SpatialReduction(_Grouping):
    """Keys and values from a spatially reduced map (SRA of PVT, Wang et al., ICCV 2021: a strided
    ``sr_ratio`` conv + norm; ``linear=True``: PVTv2's adaptive average pool to 7x7 + 1x1 conv + norm
    + GELU, Wang et al., CVMJ 2022).  Prefix tokens stay unreduced.  Names ``sr``, ``norm`` as timm's."""

    def __init__(self, sr_ratio: int = 1, linear: bool = False, norm: str = "layernorm", norm_eps: float = 1e-5):
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.sr_ratio, self.linear, self.norm, self.norm_eps = sr_ratio, linear, norm, norm_eps

    def setup(self, host) -> None:
        from vitlab.layers.norm import create_norm

        host.pool = host.sr = host.norm = host.act = None
        if self.linear:
            host.pool = nn.AdaptiveAvgPool2d(7)
            host.sr = nn.Conv2d(host.dim, host.dim, kernel_size=1)
            host.act = nn.GELU()
        elif self.sr_ratio > 1:
            host.sr = nn.Conv2d(host.dim, host.dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
        if host.sr is not None:
            host.norm = create_norm(self.norm, host.dim, eps=self.norm_eps)

    def inputs(self, host, x, layout):
        if host.sr is None:
            return x, x, None
        if layout is None:
            layout = as_layout(x.shape[1])
        p = layout.num_prefix
        fm = layout.to_map(x)
        if host.pool is not None:
            fm = host.pool(fm)
        t = host.norm(host.sr(fm).flatten(2).transpose(1, 2))
        if host.act is not None:
            t = host.act(t)
        return x, (torch.cat([x[:, :p], t], dim=1) if p else t), None

    @property
    def keys_are_queries(self) -> bool:
        return not self.linear and self.sr_ratio == 1

    def key_grid(self, layout):
        if layout is None:
            return None, 0
        if self.linear:
            return (7, 7), layout.num_prefix
        r = self.sr_ratio
        return tuple((g - r) // r + 1 for g in layout.grid), layout.num_prefix


@GROUPINGS.register("class_query")
class ClassQuery(_Grouping):
    """Only the prefix (class) tokens ask; keys and values are all tokens (class attention of CaiT,
    Touvron et al., ICCV 2021).  The output holds the prefix tokens only."""

    queries_prefix_only = True
    keys_are_queries = False

    def inputs(self, host, x, layout):
        if layout is None or layout.num_prefix < 1:
            raise ValueError("class-token queries need at least one prefix (class) token")
        return x[:, :layout.num_prefix], x, None
