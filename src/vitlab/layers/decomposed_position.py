"""The ``decomposed_relative`` position part: decomposed relative position embeddings (MViTv2, ViTDet, SAM).

"MViTv2: Improved Multiscale Vision Transformers for Classification and Detection" (Li, Wu, Fan, Mangalam, Xiong,
Malik & Feichtenhofer, CVPR 2022), sec. 4.1, "decomposed relative position embedding": the logit of query ``i`` and
key ``j`` gets ``q_i . R_{p(i), p(j)}``, a learned vector per relative position read by the query itself, and the
embedding is decomposed along the axes of the grid, ``R = R^h_{h(i), h(j)} + R^w_{w(i), w(j)}`` (``+ R^t`` for
video), so each axis of size ``s`` needs one table ``(2 s - 1, head_dim)`` instead of one per 2-D offset.  ViTDet
("Exploring Plain Vision Transformer Backbones for Object Detection", Li, Mao, Girshick & He, ECCV 2022) puts it in
a plain ViT with windowed and a few global blocks, and so does SAM's image encoder ("Segment Anything", Kirillov et
al., ICCV 2023, appendix A).  As in the official code (and timm's ``get_decomposed_rel_pos_bias``) the term uses the
unscaled query and is added after the ``1 / sqrt(d)`` scaling; the tables start at zero.

The tables live on the attention as ``rel_pos_h``, ``rel_pos_w`` (``rel_pos_t``, ``rel_pos_h``, ``rel_pos_w`` on a
3-D grid; the official names), sized by the grid of one attention group as built (a window, or the whole map for
global attention).  A group of another size at run time (another input size) reads the tables linearly
interpolated to ``2 s - 1`` rows, as the official code does.  Any grouping whose queries are also its keys on a 2-D
or 3-D group grid takes the part (windows, the whole map, dilated groups, stripes of one shape); prefix (class)
tokens get no term.  Reduced or other keys, other grid ranks and cores without an additive logit bias are refused.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import POSITION_BIASES
from vitlab.layers.position_bias import _Position
from vitlab.layers.rope import queries_are_keys

__all__ = ["DecomposedRelativePosition", "relative_embeddings", "decomposed_bias", "AXES"]

AXES = {2: ("h", "w"), 3: ("t", "h", "w")}  # table names per grid rank (the official code's)
_LETTERS = "xyz"  # einsum letters of the grid axes


def relative_embeddings(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """``(q_size, k_size, C)``: the embedding of every query/key position pair along one axis, from a
    ``(L, C)`` table of relative positions.  The table is linearly interpolated to ``2 max(q, k) - 1`` rows when
    it has another length; a shorter axis has its coordinates stretched to the longer one's (MViTv2's pooled keys),
    so query ``a`` and key ``b`` read row ``a * max(k/q, 1) - b * max(q/k, 1) + (k - 1) * max(q/k, 1)``."""
    rows = 2 * max(q_size, k_size) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.t()[None], size=rows, mode="linear")[0].t()
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    qc = torch.arange(q_size, dtype=torch.float32, device=table.device)[:, None] * q_scale
    kc = torch.arange(k_size, dtype=torch.float32, device=table.device)[None, :] * k_scale
    return table[(qc - kc + (k_size - 1) * k_scale).long()]


def decomposed_bias(q: torch.Tensor, tables: Sequence[torch.Tensor], grid: Tuple[int, ...]) -> torch.Tensor:
    """``(B, h, N, N)`` logit bias of queries ``q (B, h, N, d)`` on ``grid`` (``N = prod(grid)``, raster order)
    attending to keys on the same grid: ``sum_a q_i . R^a[i_a, j_a]``, one table per grid axis."""
    rank, (b, nh, n, d) = len(grid), q.shape
    axes = _LETTERS[:rank]
    qg = q.reshape(b, nh, *grid, d)
    total = q.new_zeros(())
    for a, (table, size) in enumerate(zip(tables, grid)):
        r = relative_embeddings(size, size, table).to(q.dtype)  # (size, size, d)
        rel = torch.einsum(f"bn{axes}c,{axes[a]}kc->bn{axes}k", qg, r)  # (B, h, *grid, size)
        total = total + rel.reshape(*rel.shape[:-1], *[size if i == a else 1 for i in range(rank)])
    return total.reshape(b, nh, n, n)


@POSITION_BIASES.register("decomposed_relative")
class DecomposedRelativePosition(_Position):
    """Decomposed relative position embeddings (see the module docstring): per grid axis a zero-initialised table
    ``rel_pos_{axis}`` ``(2 s - 1, head_dim)`` on the host, read by each grid query."""

    logit_bias = True

    def setup(self, host) -> None:
        where = f"grouping '{host.grouping.name}'"
        if not queries_are_keys(host):
            raise ValueError(f"position bias 'decomposed_relative' cannot be combined with {where} here: its queries "
                             "are not the keys, so a query-key pair has no offset on one grid")
        if host.layout is None:
            raise ValueError(f"position bias 'decomposed_relative' needs the token grid its tables are sized by; this "
                             f"attention ({where}) is built without one (tokens of any layout, e.g. packed sequences)")
        grid = host.grouping.key_grid(host.layout)[0]
        if grid is None or len(grid) not in AXES:
            raise ValueError(f"position bias 'decomposed_relative' needs 2-D or 3-D attention groups; these have grid "
                             f"{None if grid is None else tuple(grid)}")
        if hasattr(host, "rel_pos_w"):
            raise ValueError("position bias 'decomposed_relative' is already on this attention; add it once")
        for axis, size in zip(AXES[len(grid)], grid):
            setattr(host, f"rel_pos_{axis}", nn.Parameter(torch.zeros(2 * size - 1, host.head_dim)))
        host.rel_pos_grid = tuple(grid)

    def bias(self, host, branch) -> torch.Tensor:
        """``(B', h, P + n, P + n)``: the term of the branch's grid queries, zero rows and columns for prefix tokens."""
        grid = None if branch.grid is None else tuple(branch.grid)
        if grid is None or len(grid) != len(host.rel_pos_grid):
            raise ValueError(f"position bias 'decomposed_relative' was built for {len(host.rel_pos_grid)}-D groups "
                             f"{host.rel_pos_grid}; got groups of grid {grid}")
        p = branch.num_prefix
        tables = [getattr(host, f"rel_pos_{axis}") for axis in AXES[len(grid)]]
        b = decomposed_bias(branch.q[:, :, p:], tables, grid)
        return F.pad(b, (p, 0, p, 0)) if p else b
