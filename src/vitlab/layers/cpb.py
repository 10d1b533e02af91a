"""The ``cpb`` position part: Swin V2's log-spaced continuous position bias.

"Swin Transformer V2: Scaling Up Capacity and Resolution" (Liu et al., CVPR 2022), sec. 3.3: a bias per head for
each query-key offset ``(dy, dx)`` inside an attention group, made by a small MLP (``cpb_mlp``: Linear(2, 512),
ReLU, Linear(512, heads) without bias; timm's names) from the log-spaced offset
``sign(t) * log2(1 + |t|) / log2(8)`` with ``t = 8 * offset / (w - 1)`` per axis (eq. 4; ``w`` is the group's side,
or ``pretrained_window_size`` when a model pre-trained with smaller windows is fine-tuned with larger ones, so the
offsets it saw keep their coordinates), squashed to ``16 * sigmoid``.  The MLP's weights do not depend on the group
size, so a checkpoint transfers across windows as it is.

Any grouping whose queries are also its keys on a 2-D group grid takes it: windows (Swin), the whole map (ViT; the
class tokens get no bias), dilated groups (offsets in units of the dilation), stripes of one shape.  Reduced or
other keys (PVT, LeViT, class-token queries), 3-D groups and cores without an additive logit bias are refused.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import POSITION_BIASES
from vitlab.layers.dynamic_position import relative_offsets
from vitlab.layers.position_bias import _Position
from vitlab.layers.rope import queries_are_keys
from vitlab.layers.window import relative_position_index

__all__ = ["ContinuousPositionBias", "log_spaced_offsets"]

CPB_SCALE = 16.0  # the bias lies in (0, 16): 16 * sigmoid (the official code)


def log_spaced_offsets(grid: Tuple[int, int], pretrained: Tuple[int, int] = (0, 0), device=None) -> torch.Tensor:
    """``((2h-1)(2w-1), 2)`` log-spaced offsets of a ``grid = (h, w)`` group in the order of
    :func:`~vitlab.layers.window.relative_position_index` (eq. 4 of Liu et al., 2022): each axis divided by
    ``side - 1`` (the pre-training window's when ``pretrained[0] > 0``, as timm; at least 1), times 8, then
    ``sign(t) * log2(1 + |t|) / log2(8)``."""
    sides = pretrained if pretrained[0] > 0 else grid
    t = relative_offsets(grid[0], grid[1], device)
    t = t / torch.tensor([max(s - 1, 1) for s in sides], dtype=t.dtype, device=t.device) * 8
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def _window_pair(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 0 for v in pair):
        raise ValueError(f"pretrained_window_size must be 0 (none), a window side or an (h, w) pair of sides >= 0, "
                         f"got {value!r}")
    return pair  # type: ignore[return-value]


@POSITION_BIASES.register("cpb")
class ContinuousPositionBias(_Position):
    """Swin V2's continuous position bias (see the module docstring): ``cpb_dim`` hidden units (512),
    ``pretrained_window_size`` (0: the group's own size).  The offsets and index of the group grid the
    attention is built for are non-persistent buffers (``relative_coords_table`` as timm's, and ``cpb_position_index``:
    not timm's ``relative_position_index``, which other position parts on the same attention own); another group
    grid (a grouping whose groups change per call) is computed when it comes."""

    logit_bias = True

    def __init__(self, cpb_dim: int = 512, pretrained_window_size: Union[int, Sequence[int]] = 0):
        if not isinstance(cpb_dim, int) or cpb_dim < 1:
            raise ValueError(f"cpb_dim must be a positive int, got {cpb_dim!r}")
        self.cpb_dim, self.pretrained = cpb_dim, _window_pair(pretrained_window_size)

    def setup(self, host) -> None:
        if not queries_are_keys(host):
            raise ValueError(f"position bias 'cpb' cannot be combined with grouping '{host.grouping.name}' here: its "
                             "queries are not the keys, so a query-key pair has no offset on one grid")
        if hasattr(host, "cpb_mlp"):  # a family's own cpb plus the user's: two parts would share one MLP
            raise ValueError("position bias 'cpb' is already on this attention (Swin V2 has its own); add it once")
        grid = host.grouping.key_grid(host.layout)[0] if host.layout is not None else None
        if grid is not None and len(grid) != 2:
            raise ValueError(f"position bias 'cpb' needs 2-D attention groups; these are {len(grid)}-D "
                             f"(grid {tuple(grid)}): use position 'rope' or none")
        host.cpb_mlp = nn.Sequential(nn.Linear(2, self.cpb_dim), nn.ReLU(),
                                     nn.Linear(self.cpb_dim, host.num_heads, bias=False))
        host.cpb_grid = tuple(grid) if grid is not None else None
        if grid is not None:
            host.register_buffer("relative_coords_table", log_spaced_offsets(tuple(grid), self.pretrained),
                                 persistent=False)
            host.register_buffer("cpb_position_index", relative_position_index(*grid), persistent=False)

    def _tables(self, host, grid: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
        if grid == host.cpb_grid:
            return host.relative_coords_table, host.cpb_position_index
        if len(grid) != 2:
            raise ValueError(f"position bias 'cpb' needs 2-D attention groups; got a {len(grid)}-D group grid "
                             f"{grid} (packed sequences have no common image grid)")
        dev = host.cpb_mlp[0].weight.device
        return log_spaced_offsets(grid, self.pretrained, dev), relative_position_index(*grid, device=dev)

    def bias(self, host, branch) -> Optional[torch.Tensor]:
        """``(1, h, P + n, P + n)``: the biases of the branch's heads, zero rows and columns for prefix tokens."""
        if branch.grid is None:
            raise ValueError("position bias 'cpb' needs the grid of each attention group; this grouping gives none")
        coords, index = self._tables(host, tuple(branch.grid))
        table = CPB_SCALE * torch.sigmoid(host.cpb_mlp(coords.to(host.cpb_mlp[0].weight.dtype)))  # (M, heads)
        n = index.shape[0]
        b = table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)[:, branch.heads]
        p = branch.num_prefix
        return F.pad(b, (p, 0, p, 0)) if p else b
