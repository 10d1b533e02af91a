"""ScalableViT's attention parts: scalable self-attention (SSA) and the local interactive module (LIM).

"ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer" (Yang, Zhou, Yu, Zhang,
Li, Wang & Zheng, ECCV 2022):

* **SSA** (sec. 3.1): keys and values come from a map reduced spatially by ``r_n`` (a depthwise ``r x r``
  stride-``r`` conv, then a 1x1 conv to ``c_ratio * C`` channels, LayerNorm and GELU: the grouping
  ``scalable_reduction``, names ``reduction``, ``norm_act`` as the official code); queries and keys live in
  the scaled width ``c_ratio * C``, values are projected back to ``C`` (the projection ``scalable``: ``q``
  ``C -> C'``, ``k`` ``C' -> C'``, ``v`` ``C' -> C``).  The logits are scaled by ``(d * c_ratio)^-1/2``
  (``d = C / heads``; the q/k head width): the projection multiplies ``q`` by ``c_ratio^-1/2`` and the core
  applies its ``d^-1/2``, so every core keeps its own scale rule (cosine attention is unaffected).  With
  ``sr_ratio == 1`` the official code keeps ``q`` and ``kv`` of width ``C`` (PVT's projections) but still
  scales by ``(d * c_ratio)^-1/2``; so does this projection.
* **IWSA** (sec. 3.2): window attention plus the LIM, a 3x3 depthwise conv of the value map (all windows put
  back together, so it reaches across window borders) added to the attention output before ``proj``: the
  position part ``lim`` (conv ``lim_func``), on the ``window`` or ``global`` grouping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import GROUPINGS, POSITION_BIASES, PROJECTIONS
from vitlab.layers.grouping import _Grouping
from vitlab.layers.layout import as_layout
from vitlab.layers.linear import Linear
from vitlab.layers.position_bias import _Position
from vitlab.layers.projection import _Projection, split_heads
from vitlab.layers.window import window_partition, window_reverse

__all__ = ["ScalableReduction", "ScalableProjection", "LocalInteractiveModule"]


def _check_ratio(c_ratio: float) -> None:
    if not c_ratio > 0:
        raise ValueError(f"c_ratio must be > 0, got {c_ratio}")


@GROUPINGS.register("scalable_reduction")
class ScalableReduction(_Grouping):
    """Queries from every token, keys/values from the reduced, channel-scaled map (SSA, see the module
    docstring); ``sr_ratio == 1``: keys are the tokens themselves."""

    def __init__(self, sr_ratio: int = 1, c_ratio: float = 1.25, norm: str = "layernorm", norm_eps: float = 1e-5):
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        _check_ratio(c_ratio)
        self.sr_ratio, self.c_ratio, self.norm, self.norm_eps = sr_ratio, c_ratio, norm, norm_eps

    @property
    def takes_prefix(self) -> bool:  # reduced keys are C' wide: prefix tokens (C wide) cannot join them
        return self.sr_ratio == 1

    @property
    def keys_are_queries(self) -> bool:
        return self.sr_ratio == 1

    def setup(self, host) -> None:
        from vitlab.layers.norm import create_norm

        host.reduction = host.norm_act = None
        if self.sr_ratio > 1:
            c_new = int(host.dim * self.c_ratio)
            r = self.sr_ratio
            host.reduction = nn.Sequential(nn.Conv2d(host.dim, host.dim, r, stride=r, groups=host.dim),
                                           nn.Conv2d(host.dim, c_new, 1))
            host.norm_act = nn.Sequential(create_norm(self.norm, c_new, eps=self.norm_eps), nn.GELU())

    def inputs(self, host, x, layout):
        if host.reduction is None:
            return x, x, None
        layout = layout or as_layout(x.shape[1])
        t = host.reduction(layout.to_map(x)).flatten(2).transpose(1, 2)
        return x, host.norm_act(t), None

    def key_grid(self, layout):
        if layout is None:
            return None, 0
        r = self.sr_ratio
        return tuple((g - r) // r + 1 for g in layout.grid), layout.num_prefix


@PROJECTIONS.register("scalable")
class ScalableProjection(_Projection):
    """SSA's projections (see the module docstring): ``q``, ``k``, ``v`` after a channel-scaling reduction
    (``host.reduction``), else ``q`` and ``kv``; ``q`` is multiplied by ``c_ratio^-1/2`` (the official scale)."""

    def __init__(self, c_ratio: float = 1.25, qkv_bias: bool = True):
        _check_ratio(c_ratio)
        self.c_ratio, self.qkv_bias = c_ratio, qkv_bias

    def setup(self, host) -> None:
        reduction = getattr(host, "reduction", None)
        if reduction is None:
            host.q = Linear(host.dim, host.inner, bias=self.qkv_bias)
            host.kv = Linear(host.dim, 2 * host.inner, bias=self.qkv_bias)
            return
        c_new = reduction[-1].out_channels
        if c_new % host.num_heads:
            raise ValueError(f"the scaled width {c_new} (dim {host.dim} x c_ratio {self.c_ratio}) must be divisible "
                             f"by num_heads={host.num_heads}")
        host.q = Linear(host.dim, c_new, bias=self.qkv_bias)
        host.k = Linear(c_new, c_new, bias=self.qkv_bias)
        host.v = Linear(c_new, host.inner, bias=self.qkv_bias)

    def __call__(self, host, xq, xkv):
        h = host.num_heads
        if getattr(host, "reduction", None) is None:
            k, v = (split_heads(t, h) for t in host.kv(xkv).chunk(2, dim=-1))
        else:
            k, v = split_heads(host.k(xkv), h), split_heads(host.v(xkv), h)
        q = split_heads(host.q(xq), h)
        return (q if self.c_ratio == 1 else q * self.c_ratio ** -0.5), k, v


@POSITION_BIASES.register("lim")
class LocalInteractiveModule(_Position):
    """ScalableViT's LIM: ``DWConv3x3(V)`` on the whole value map, added to the attention output of each
    group (see the module docstring); the conv is ``lim_func`` (official name)."""

    value_map = True

    def __init__(self, lim_kernel: int = 3):
        if lim_kernel < 1 or lim_kernel % 2 == 0:
            raise ValueError(f"lim_kernel must be odd and >= 1, got {lim_kernel}")
        self.kernel = lim_kernel

    def setup(self, host) -> None:
        if host.grouping.name not in ("window", "global"):
            raise ValueError(f"position part 'lim' convolves the value map of the window or global grouping, not "
                             f"of grouping '{host.grouping.name}'")
        c = host.inner
        host.lim_func = nn.Conv2d(c, c, self.kernel, padding=self.kernel // 2, groups=c)

    def value_term(self, host, branch):
        v, p = branch.v, branch.num_prefix
        bs, nh, n, d = v.shape
        tokens = v.transpose(1, 2).reshape(bs, n, nh * d)
        g = host.grouping
        if g.name == "global":  # one group: the map itself (prefix tokens get no term)
            gh, gw = branch.grid
            out = host.lim_func(tokens[:, p:].transpose(1, 2).reshape(bs, nh * d, gh, gw)).flatten(2)
            out = out.reshape(bs, nh, d, gh * gw).transpose(2, 3)
            return F.pad(out, (0, 0, p, 0)) if p else out
        h, w = g.grid
        (wh, ww), (sh, sw) = g.window, g.shift_size
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        fm = window_reverse(tokens, g.window, hp, wp)  # (B, Hp, Wp, C) of the shifted map
        fm = fm[:, :h, :w]
        fm = torch.roll(fm, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else fm  # the grouping rolled, then padded
        out = host.lim_func(fm.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = torch.roll(out, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else out
        out = F.pad(out, (0, 0, 0, wp - w, 0, hp - h))
        return window_partition(out, g.window).reshape(bs, n, nh, d).transpose(1, 2)
