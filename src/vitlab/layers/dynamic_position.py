"""The ``dynamic`` position part: CrossFormer's dynamic position bias (DPB).

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang et al., ICLR 2022),
sec. 3.3: instead of a table with one entry per relative offset (Swin), a small MLP maps each offset
``(dy, dx)`` of a query to a key inside a group to one bias per head, so any group size shares the same
weights.  The MLP is the official code's ``DynamicPosBias``: ``pos_proj`` Linear(2, D), then three times
LayerNorm -> ReLU -> Linear (``pos1``, ``pos2``, ``pos3``; the last to ``heads``), with residual
connections around ``pos1``/``pos2`` when ``dpb_residual``; ``D = dim // 16`` by default (the official
classification code passes ``dim // 4`` to a module that divides it by 4 again).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import POSITION_BIASES
from vitlab.layers.position_bias import _Position
from vitlab.layers.window import relative_position_index

__all__ = ["DynamicPositionBias", "DynamicPosBiasMLP", "relative_offsets"]


def relative_offsets(gh: int, gw: int, device=None) -> torch.Tensor:
    """Every offset of a ``gh x gw`` group, ``((2gh-1)(2gw-1), 2)`` float ``(dy, dx)``, in the order
    :func:`~vitlab.layers.window.relative_position_index` indexes."""
    dy = torch.arange(1 - gh, gh, device=device)
    dx = torch.arange(1 - gw, gw, device=device)
    return torch.stack(torch.meshgrid(dy, dx, indexing="ij")).flatten(1).transpose(0, 1).float()


class DynamicPosBiasMLP(nn.Module):
    """Offsets ``(M, 2)`` -> biases ``(M, heads)``; names as the official ``DynamicPosBias``."""

    def __init__(self, pos_dim: int, num_heads: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(pos_dim), nn.ReLU(), nn.Linear(pos_dim, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        pos = self.pos_proj(offsets)
        if self.residual:
            pos = pos + self.pos1(pos)
            return self.pos3(pos + self.pos2(pos))
        return self.pos3(self.pos2(self.pos1(pos)))


@POSITION_BIASES.register("dynamic")
class DynamicPositionBias(_Position):
    """A logit bias per head from an MLP of the query-key offset inside each group (see the module docstring).
    The MLP is ``pos`` on the attention module (the official name); it runs on each call's group grid, so
    the part fits any group size.  Prefix keys/queries get no bias."""

    logit_bias = True

    def __init__(self, dpb_dim: Optional[int] = None, dpb_residual: bool = False):
        if dpb_dim is not None and dpb_dim < 1:
            raise ValueError(f"dpb_dim must be >= 1, got {dpb_dim}")
        self.dpb_dim, self.residual = dpb_dim, dpb_residual

    def setup(self, host) -> None:
        pos_dim = self.dpb_dim or max(host.dim // 16, 1)
        host.pos = DynamicPosBiasMLP(pos_dim, host.num_heads, self.residual)

    def bias(self, host, branch):
        if branch.grid is None or len(branch.grid) != 2:
            raise ValueError(f"the dynamic position bias needs 2-D groups, got group grid {branch.grid}")
        gh, gw = branch.grid
        dev = host.pos.pos_proj.weight.device
        table = host.pos(relative_offsets(gh, gw, dev).to(host.pos.pos_proj.weight.dtype))  # (M, heads)
        n = gh * gw
        b = table[relative_position_index(gh, gw, dev).reshape(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        b = b[:, branch.heads]
        p = branch.num_prefix
        return F.pad(b, (p, 0, p, 0)) if p else b
