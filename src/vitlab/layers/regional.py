"""Regional-to-local attention: the grouping ``regional`` and its position part ``regional_relative``.

"RegionViT: Regional-to-Local Attention for Vision Transformers" (Chen, Panda & Fan, ICLR 2022, sec. 3.2).
The tokens are two streams laid out as one sequence: the regional tokens first (the layout's prefix, one per
region, regions in raster order), then the local tokens of the map.  Each region covers a ``window_size``
square of local tokens, so the local map is ``window_size`` times the regional grid.

* Called on such a sequence, the grouping puts every regional token in front of its window of local tokens:
  ``B * regions`` groups of ``1 + window_size**2`` tokens (the paper's local self-attention, LSA).
* Called on the regional tokens alone (a layout without prefix tokens), every regional token attends to every
  other (the paper's regional self-attention, RSA), so one attention module, with one set of weights, serves
  both steps as in the paper and the official code.

``regional_relative`` is the official code's ``rel_pos``: a learned bias per head and relative offset inside a
window, ``(heads, (2w-1)**2)``, on the local-to-local logits of the LSA groups only (the regional token's row and
column and the RSA get none).  Its index is the official one (offsets ``key - query + w // 2``, wrapped modulo
``2w - 1``), so the official weights load without reordering.

A local map that is not ``window_size`` times the regional grid is zero-padded at the bottom and right to it
(:func:`join_streams`, the official ``convert_to_flatten_layout``): the padded tokens live through the stage's
blocks (:class:`RegionalLayout` records the padding) and the LSA masks them with the official per-window masks
(:func:`padding_keep`, built from the call's layout into the LSA branch's ``keep`` by ``branches`` and added to the
logits by ``with_mask``: nothing of one call is kept on the grouping), dropped again by :func:`local_map` when the
stage ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import GROUPINGS, POSITION_BIASES, require_layout
from vitlab.layers.grouping import Branch, _Grouping
from vitlab.layers.layout import TokenLayout
from vitlab.layers.position_bias import _Position
from vitlab.layers.window import window_partition, window_reverse

__all__ = ["RegionalToLocal", "RegionalRelativeBias", "RegionalLayout", "regional_index", "regional_grid",
           "join_streams", "local_map", "padding_keep"]

MASKED = -1e4  # a masked logit: exp underflows to 0 in float32, and it stays finite in float16 / bfloat16


@dataclass(frozen=True)
class RegionalLayout(TokenLayout):
    """A two-stream :class:`TokenLayout` whose local map (``grid``) holds ``pad = (rows, cols)`` zero-padded rows
    at the bottom and columns at the right, so that it is ``window_size`` times the regional grid."""

    pad: Tuple[int, int] = (0, 0)


def join_streams(regions: torch.Tensor, local: torch.Tensor, window: int) -> Tuple[torch.Tensor, TokenLayout]:
    """Regional ``(B, C, rh, rw)`` and local ``(B, C, h, w)`` maps -> tokens ``(B, R + H*W, C)`` and their layout,
    the local map zero-padded at the bottom and right to ``(rh * window, rw * window)`` where it is smaller (the
    official ``convert_to_flatten_layout``; a :class:`RegionalLayout` then records the padding)."""
    (rh, rw), (h, w) = regions.shape[-2:], local.shape[-2:]
    pad = (rh * window - h, rw * window - w)
    if min(pad) < 0:
        raise ValueError(f"a {h}x{w} local map does not fit {rh}x{rw} regions of {window}x{window} local tokens")
    layout = TokenLayout((h, w), rh * rw)
    if any(pad):
        local = F.pad(local, (0, pad[1], 0, pad[0]))
        layout = RegionalLayout(local.shape[-2:], rh * rw, pad=pad)
    return torch.cat([regions.flatten(2).transpose(1, 2), local.flatten(2).transpose(1, 2)], dim=1), layout


def local_map(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The local tokens of ``x`` as a ``(B, C, h, w)`` map, the padding of a :class:`RegionalLayout` dropped (the
    official ``convert_to_spatial_layout``)."""
    fm = layout.to_map(x)
    ph, pw = getattr(layout, "pad", (0, 0))
    return fm[:, :, :fm.shape[2] - ph, :fm.shape[3] - pw]


def padding_keep(regions: Tuple[int, int], window: int, pad: Tuple[int, int]) -> torch.Tensor:
    """``(R, n, n)`` booleans (True: attend), ``n = 1 + window**2``: the official LSA masks of a padded map, per
    region in raster order.  A token (the regional one counts as valid in both) is *x-valid* if its column is
    among the first ``window - pad[1]`` of its window and *y-valid* if its row is among the first
    ``window - pad[0]``; the windows of the last column (last row excepted) keep query/key pairs both x-valid,
    those of the last row pairs both y-valid, and the last window, as the official code builds it, the union of
    the two (so some padded keys stay visible there); every other window keeps all pairs."""
    rh, rw = regions
    t = torch.arange(1 + window * window)
    x_ok = (t == 0) | ((t - 1) % window < window - pad[1])
    y_ok = (t == 0) | ((t - 1) // window < window - pad[0])
    right, bottom = x_ok[:, None] & x_ok[None, :], y_ok[:, None] & y_ok[None, :]
    keep = torch.ones(rh, rw, t.numel(), t.numel(), dtype=torch.bool)
    keep[:, -1] = right
    keep[-1] = bottom
    keep[-1, -1] = right | bottom
    return keep.reshape(rh * rw, t.numel(), t.numel())


def regional_grid(layout: TokenLayout, window: int) -> Tuple[int, int]:
    """The regional grid of a two-stream ``layout`` (local map ``window`` times the regions); a clear error
    when the local map and the prefix count do not fit."""
    h, w = layout.hw
    rh, rw = h // window, w // window
    if h % window or w % window or rh * rw != layout.num_prefix:
        raise ValueError(f"regional-to-local attention needs a local map of window_size ({window}) times the "
                         f"regional grid with one regional token per region; got a {h}x{w} map and "
                         f"{layout.num_prefix} regional tokens")
    return rh, rw


def regional_index(window: int) -> torch.Tensor:
    """``(w*w, w*w)`` index into the ``(2w-1)**2`` offsets: query ``(y, x)``, key ``(y', x')`` ->
    ``((y' - y + w//2) mod (2w-1)) * (2w-1) + (x' - x + w//2) mod (2w-1)`` (the official code's order)."""
    side = 2 * window - 1
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[None, :] - ys[:, None] + window // 2) % side
    dx = (xs[None, :] - xs[:, None] + window // 2) % side
    return dy * side + dx


@GROUPINGS.register("regional")
class RegionalToLocal(_Grouping):
    """Each regional token with its ``window_size`` window of local tokens (RegionViT's LSA), or the regional
    tokens among themselves when called without prefix tokens (RSA); see the module docstring."""

    takes_prefix = True  # the prefix tokens are the regional tokens

    def __init__(self, window_size: int = 7):
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size = window_size

    def setup(self, host) -> None:
        self.window = (self.window_size, self.window_size)

    def key_grid(self, layout):
        return self.window, 1

    def inputs(self, host, x, layout):
        if layout.num_prefix == 0:  # the regional tokens alone: one group (RSA)
            return x, x, None
        regional_grid(layout, self.window_size)  # a clear error when the map and the regions do not fit
        if any(getattr(layout, "pad", (0, 0))) and not host.core.takes_bias:  # the padding is masked as logits
            raise ValueError(f"a padded local map needs a core that takes a logit mask (softmax, cosine), got "
                             f"core '{host.core.name}'")
        b, n, c = x.shape
        p = layout.num_prefix
        local = window_partition(x[:, p:].reshape(b, *layout.hw, c), self.window)  # windows in region order
        groups = torch.cat([x[:, :p].reshape(b * p, 1, c), local], dim=1)
        return groups, groups, (b, p, layout.hw)

    def branches(self, host, q, k, v, layout, state):
        if state is None:
            return [Branch(q, k, v, slice(0, host.num_heads), layout.grid, 0)]
        pad = getattr(layout, "pad", (0, 0))
        keep = None
        if any(pad):  # the call's padding masks travel on its branch (no per-call state on the grouping)
            keep = padding_keep(regional_grid(layout, self.window_size), self.window_size, pad).to(q.device)
        return [Branch(q, k, v, slice(0, host.num_heads), self.window, 1, keep=keep)]

    def with_mask(self, host, bias, branch):
        """``bias`` ``(1, h, n, n)`` plus the branch's official padding masks (``branch.keep``, :func:`padding_keep`)
        as ``MASKED`` logits, for its ``B * R`` groups; unchanged when the local map was not padded.  The official
        code fills masked logits with the dtype's minimum instead, so a query with every key masked attends uniformly
        there and by its own logits here: such queries are padded tokens that no kept query reads, so no output
        differs."""
        keep, rows = branch.keep, branch.q.shape[0]
        if keep is None:
            return bias
        m = torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, MASKED)[:, None]
        if bias is not None and bias.shape[0] > 1:  # one bias per group (it reads the queries: decomposed_relative)
            return (bias.to(m.dtype).reshape(rows // m.shape[0], *m.shape[:1], *bias.shape[1:]) + m).flatten(0, 1)
        m = m if bias is None else m + bias.to(m.dtype)
        return m.expand(rows // m.shape[0], *m.shape).reshape(rows, *m.shape[1:])

    def outputs(self, host, y, state):
        if state is None:
            return y
        b, p, (h, w) = state
        local = window_reverse(y[:, 1:], self.window, h, w).reshape(b, h * w, -1)
        return torch.cat([y[:, 0].reshape(b, p, -1), local], dim=1)


@POSITION_BIASES.register("regional_relative")
class RegionalRelativeBias(_Position):
    """RegionViT's relative position bias (Chen et al., ICLR 2022, sec. 3.2; the official ``rel_pos``,
    ``(heads, (2w-1)**2)``, trunc-normal 0.02): on the local-to-local logits of each regional-to-local group
    only.  Needs the ``regional`` grouping."""

    logit_bias = True

    def setup(self, host) -> None:
        if not isinstance(host.grouping, RegionalToLocal):
            raise ValueError(f"position bias 'regional_relative' needs grouping 'regional', got "
                             f"'{host.grouping.name}'")
        require_layout(host, self)
        w = host.grouping.window_size
        table = torch.empty(host.num_heads, (2 * w - 1) ** 2)
        nn.init.trunc_normal_(table, std=0.02)
        host.rel_pos = nn.Parameter(table)
        host.register_buffer("rel_pos_index", regional_index(w), persistent=False)

    def bias(self, host, branch):
        if branch.num_prefix != 1:  # the regional self-attention: no window, no bias
            return None
        idx = host.rel_pos_index
        b = host.rel_pos[branch.heads][:, idx].unsqueeze(0)  # (1, h, w*w, w*w)
        return F.pad(b, (1, 0, 1, 0))
