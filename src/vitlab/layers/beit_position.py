"""BEiT's relative position bias over global attention with a class token (``attn_position=("beit_relative",)``).

"BEiT: BERT Pre-Training of Image Transformers" (Bao, Dong, Piao & Wei, ICLR 2022, sec. 2.2, "relative position
bias"; after Swin's table, Liu et al., ICCV 2021): every block's attention adds a learned bias per head to the
logit of each query/key pair of tokens, looked up by their offset on the patch grid.  Unlike Swin's windows, the
attention is global and includes the class token, so the table has ``(2H-1)(2W-1)`` rows for the grid offsets
plus 3 for the pairs with the class token: class -> patch, patch -> class and class -> class (in this order, the
official code's and timm's ``relative_position_bias_table`` / ``relative_position_index``).  The table starts at
zero (the official code).  BEiT v2 (Peng et al., 2022) keeps it unchanged.

The part works wherever the shapes allow it: global attention (every query is also a key, one group over the whole
token map, of any rank) with at least one prefix token (several -- a distillation token, registers, PiT's or
CrossViT's class tokens -- share the class token's three rows), on the grid the attention was built for (timm's
BEiT has a fixed input size too).  Elsewhere (windows, stripes, reduced keys, class-token queries, no class token)
it is refused when the model is built, with one error naming the grouping and the reason.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from vitlab.layers.attn_parts import POSITION_BIASES
from vitlab.layers.position_bias import _Position
from vitlab.layers.rope import queries_are_keys

__all__ = ["BeitRelativePositionBias", "beit_relative_index", "beit_table_rows", "resize_beit_table"]


def beit_table_rows(grid: Tuple[int, ...]) -> int:
    """Rows of BEiT's table for a token grid: ``prod(2 g - 1)`` grid offsets plus the 3 class-token rows."""
    return math.prod(2 * g - 1 for g in grid) + 3


def beit_relative_index(grid: Tuple[int, ...], num_prefix: int = 1, device=None) -> torch.Tensor:
    """``(P + N, P + N)`` row of BEiT's table for each query/key pair of ``P`` prefix tokens then the ``N`` grid
    tokens in raster order.  Grid pairs: the offset ``d = q - k`` in mixed radix, ``sum_a (d_a + g_a - 1) *
    prod_{b > a} (2 g_b - 1)`` (in 2-D ``(dy + H - 1)(2W - 1) + dx + W - 1``, Swin's and BEiT's); a prefix query
    to a grid key: row ``T - 3``, a grid query to a prefix key: ``T - 2``, prefix to prefix: ``T - 1`` (``T`` the
    table's rows)."""
    axes = torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij")
    coords = torch.stack([a.flatten() for a in axes])  # rank, N
    rel = coords[:, :, None] - coords[:, None, :]  # rank, N, N
    grid_index = torch.zeros(rel.shape[1:], dtype=torch.long, device=device)
    for axis, g in enumerate(grid):
        grid_index = grid_index * (2 * g - 1) + rel[axis] + g - 1
    rows, p = beit_table_rows(grid), num_prefix
    index = torch.full((p + coords.shape[1],) * 2, rows - 1, dtype=torch.long, device=device)
    index[p:, p:] = grid_index
    index[:p, p:] = rows - 3  # class -> patch
    index[p:, :p] = rows - 2  # patch -> class
    return index


@POSITION_BIASES.register("beit_relative")
class BeitRelativePositionBias(_Position):
    """BEiT's learned relative position bias with class-token rows (see the module docstring): a
    ``(prod(2g - 1) + 3, heads)`` table ``relative_position_bias_table`` (zero init) on the host, gathered by the
    non-persistent ``relative_position_index`` ``(P + N, P + N)`` into a ``(1, heads, P + N, P + N)`` logit bias.
    Any grid rank (a video's 3-D grid gives a ``(2T-1)(2H-1)(2W-1) + 3`` table)."""

    logit_bias = True

    def setup(self, host) -> None:
        where = f"grouping '{host.grouping.name}'"
        if host.layout is None:  # e.g. NaViT's packed sequences: a new token map on every call
            raise ValueError(f"position bias 'beit_relative' needs the fixed token grid its table is built for; this "
                             f"attention ({where}) is built without one (tokens of any layout, e.g. packed sequences)")
        layout = host.layout
        if not queries_are_keys(host):
            raise ValueError(f"position bias 'beit_relative' cannot be combined with {where} here: its queries are "
                             "not the keys, and the table is indexed by query/key token pairs of one grid")
        grid, prefix = host.grouping.key_grid(layout)
        if grid is None or (tuple(grid), prefix) != (tuple(layout.grid), layout.num_prefix):
            raise ValueError(f"position bias 'beit_relative' cannot be combined with {where} here: it attends within "
                             f"groups of grid {grid} with {prefix} prefix token(s), not over the whole {layout.grid} "
                             "map with its class token (BEiT's table is for global attention)")
        if prefix < 1:
            raise ValueError(f"position bias 'beit_relative' needs a class (prefix) token: its table has rows for "
                             f"class->patch, patch->class and class->class, but this attention's tokens have none "
                             f"({where}); build the model with a class token or use position 'relative'")
        if hasattr(host, "relative_position_bias_table"):
            raise ValueError("position bias 'beit_relative' cannot join another relative table in the same "
                             "attention (both are saved as relative_position_bias_table)")
        host.relative_position_bias_table = nn.Parameter(torch.zeros(beit_table_rows(grid), host.num_heads))
        host.register_buffer("relative_position_index", beit_relative_index(grid, prefix), persistent=False)
        host.rel_pos_window = tuple(grid)
        self.grid, self.num_prefix = tuple(grid), prefix

    def bias(self, host, branch) -> torch.Tensor:
        if branch.grid is None or tuple(branch.grid) != self.grid or branch.num_prefix != self.num_prefix:
            raise ValueError(f"position bias 'beit_relative' was built for a {self.grid} grid with {self.num_prefix} "
                             f"prefix token(s); got {branch.grid} with {branch.num_prefix} (BEiT's input size is "
                             "fixed: build the model for this image size)")
        index = host.relative_position_index
        n = index.shape[0]
        table = host.relative_position_bias_table[:, branch.heads]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


def resize_beit_table(table: torch.Tensor, new_grid: Tuple[int, int]) -> torch.Tensor:
    """A BEiT table ``((2h-1)(2w-1) + 3, heads)`` of a square ``h x w`` grid resized to ``new_grid`` (a checkpoint
    of another image size, e.g. 224 -> 384 fine-tuning): the grid rows by timm's ``resize_rel_pos_bias_table`` (the
    geometric-progression interpolation of BEiT's fine-tuning code), the 3 class-token rows kept."""
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    rows = beit_table_rows(tuple(new_grid))
    side = math.isqrt(max(table.shape[0] - 3, 0)) if table.ndim == 2 else 0
    if table.ndim != 2 or side * side != table.shape[0] - 3 or side % 2 == 0:
        raise ValueError(f"expected a BEiT relative table ((2w-1)^2 + 3, heads) of a square grid, got shape "
                         f"{tuple(table.shape)}")
    if table.shape[0] == rows:
        return table
    return resize_rel_pos_bias_table(table, tuple(new_grid), (rows, table.shape[1]))
