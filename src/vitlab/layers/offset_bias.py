"""LeViT's attention bias (position part ``offset``) and subsampled queries (grouping ``subsample``).

"LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference" (Graham, El-Nouby, Touvron, Stock,
Joulin, Jegou and Douze, ICCV 2021), sec. 4.2 "Attention bias" and "Shrink attention blocks":

* position part ``offset`` (:class:`OffsetBias`): a learned scalar per head for each absolute offset
  ``(|dy|, |dx|)`` between a query's and a key's place on the map, added to the logits;
* grouping ``subsample`` (:class:`SubsampleQueries`): the queries are every ``query_stride``-th token of the map
  in each direction, the keys and values all tokens, so the output is the smaller map (LeViT's shrinking
  attention between stages).  Its queries sit at ``query_stride * (i, j)``, which the offset bias reads.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import GROUPINGS, POSITION_BIASES, require_layout
from vitlab.layers.grouping import _Grouping
from vitlab.layers.layout import TokenLayout, as_layout
from vitlab.layers.position_bias import _Position

__all__ = ["offset_index", "OffsetBias", "SubsampleQueries"]


def _positions(h: int, w: int, step: int = 1) -> torch.Tensor:
    """``(2, n)`` (row, column) of every ``step``-th place of an ``h x w`` map, in raster order."""
    ys, xs = torch.meshgrid(torch.arange(0, h, step), torch.arange(0, w, step), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()])


def offset_index(key_grid: Tuple[int, int], query_stride: int = 1) -> torch.Tensor:
    """``(Nq, Nk)`` table index ``|dy| * w + |dx|`` of the offset between query ``i`` (at ``query_stride`` times
    its place on the subsampled map) and key ``j`` of an ``h x w`` key map (LeViT's order, as the official code)."""
    h, w = key_grid
    d = (_positions(h, w, query_stride)[:, :, None] - _positions(h, w)[:, None, :]).abs()
    return d[0] * w + d[1]


@POSITION_BIASES.register("offset")
class OffsetBias(_Position):
    """LeViT's attention bias (Graham et al., ICCV 2021, sec. 4.2): ``attention_biases`` ``(heads, h * w)``, one
    learned scalar per head and offset ``(|dy|, |dx|)`` on the ``h x w`` key map of a group (zero init, as the
    official code), gathered by the non-persistent ``attention_bias_idxs`` ``(Nq, Nk)``.  Queries of a grouping with
    ``query_stride`` (``subsample``) sit at ``query_stride * (i, j)``.  Prefix queries and keys get no bias.  Names
    as timm's ``levit.Attention``."""

    logit_bias = True

    def setup(self, host) -> None:
        grid, _ = host.grouping.key_grid(require_layout(host, self))
        if grid is None or len(grid) != 2:
            raise ValueError(f"position bias 'offset' needs a 2-D key map, got grid {grid}")
        host.attention_biases = nn.Parameter(torch.zeros(host.num_heads, grid[0] * grid[1]))
        host.register_buffer("attention_bias_idxs", offset_index(grid, getattr(host.grouping, "query_stride", 1)),
                             persistent=False)

    def bias(self, host, branch):
        p, table = branch.num_prefix, host.attention_biases
        # without autograd the gathered table is reused until the parameter changes: timm's eval-mode cache, but
        # keyed on the tensor's identity and version, so a new load_state_dict or optimizer step invalidates it
        cached = not ((torch.is_grad_enabled() and table.requires_grad) or torch.jit.is_tracing()
                      or torch.compiler.is_compiling())
        if cached:
            state = (table.data_ptr(), table._version, table.device, table.dtype)
            cache = host.__dict__.get("_offset_bias_cache")
            if cache is None or cache[0] != state:
                cache = host.__dict__["_offset_bias_cache"] = (state, {})
            key = (branch.heads.start, branch.heads.stop, branch.heads.step, p)
            if key in cache[1]:
                return cache[1][key]
        b = table[branch.heads][:, host.attention_bias_idxs].unsqueeze(0)
        b = F.pad(b, (p, 0, p, 0)) if p else b
        if cached:
            cache[1][key] = b
        return b


@GROUPINGS.register("subsample")
class SubsampleQueries(_Grouping):
    """Queries from every ``query_stride``-th token of the map in each direction, keys and values from all tokens
    (LeViT's shrinking attention, Graham et al., ICCV 2021, sec. 4.2): ``(B, h*w, C)`` in, ``(B, h'*w', C')`` out,
    ``h' = ceil(h / query_stride)``.  No prefix tokens (they have no place to subsample)."""

    takes_prefix = False

    def __init__(self, query_stride: int = 2):
        if query_stride < 1:
            raise ValueError(f"query_stride must be >= 1, got {query_stride}")
        self.query_stride = query_stride

    @property
    def keys_are_queries(self) -> bool:
        return self.query_stride == 1

    def out_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """The map of the queries (and of the output) for a key map ``grid``."""
        return tuple((g - 1) // self.query_stride + 1 for g in grid)  # type: ignore[return-value]

    def inputs(self, host, x: torch.Tensor, layout: TokenLayout):
        if self.query_stride == 1:
            return x, x, None
        layout = layout or as_layout(x.shape[1])
        s = self.query_stride
        xq = x.unflatten(1, layout.hw)[:, ::s, ::s].flatten(1, 2)
        return xq, x, None
