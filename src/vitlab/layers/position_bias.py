"""Position parts of attention (DESIGN.md, "position bias"): a bias on the logits (Swin's relative
table) or a term on the values (CSwin's LePE)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import POSITION_BIASES, AttentionPart, require_layout
from vitlab.layers.window import relative_position_index

__all__ = ["RelativePositionBias", "LePE"]


class _Position(AttentionPart):
    kind = "position bias"
    logit_bias = False

    def bias(self, host, branch) -> Optional[torch.Tensor]:
        return None

    def value_term(self, host, branch) -> Optional[torch.Tensor]:
        return None

    def finish(self, host, out: torch.Tensor, branch) -> torch.Tensor:
        return out


@POSITION_BIASES.register("relative")
class RelativePositionBias(_Position):
    """A learned bias per relative offset inside each group, ``((2h-1)(2w-1), heads)`` table
    ``relative_position_bias_table`` (trunc-normal 0.02) indexed as in the official Swin code ("Swin
    Transformer", Liu et al., ICCV 2021); ``shared_heads`` gives one column for all heads (AlterNet,
    Park & Kim, ICLR 2022).  Prefix keys/queries get no bias."""

    logit_bias = True

    def __init__(self, shared_heads: bool = False):
        self.shared_heads = shared_heads

    def setup(self, host) -> None:
        grid, _ = host.grouping.key_grid(require_layout(host, self))
        wh, ww = grid
        table = torch.empty((2 * wh - 1) * (2 * ww - 1), 1 if self.shared_heads else host.num_heads)
        nn.init.trunc_normal_(table, std=0.02)
        host.relative_position_bias_table = nn.Parameter(table)
        host.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)
        host.rel_pos_window = (wh, ww)

    def bias(self, host, branch):
        table, index = host.relative_position_bias_table, host.relative_position_index
        n = index.shape[0]
        b = table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if not self.shared_heads:
            b = b[:, branch.heads]
        p = branch.num_prefix
        return F.pad(b, (p, 0, p, 0)) if p else b


@POSITION_BIASES.register("lepe")
class LePE(_Position):
    """Locally-enhanced positional encoding ("CSWin Transformer", Dong et al., CVPR 2022): a 3x3
    depthwise conv of V on each group's map (zero-padded at its border), one conv per branch
    (``lepe.{b}``), added to the attention output.  ``div_heads`` divides the sum by
    ``sqrt(heads per branch)`` (LipsFormer-CSwin's released code)."""

    value_map = True

    def __init__(self, lepe_kernel: int = 3, div_heads: bool = False):
        self.kernel, self.div_heads = lepe_kernel, div_heads

    def setup(self, host) -> None:
        nb = len(getattr(host.grouping, "stripes", [None]))
        c = host.inner // nb
        host.lepe = nn.ModuleList([nn.Conv2d(c, c, self.kernel, padding=self.kernel // 2, groups=c)
                                   for _ in range(nb)])

    def value_term(self, host, branch):
        v, p = branch.v, branch.num_prefix
        bs, nh, s, d = v.shape
        gh, gw = branch.grid
        fm = v[:, :, p:].transpose(2, 3).reshape(bs, nh * d, gh, gw)
        out = host.lepe[branch.index](fm).reshape(bs, nh, d, gh * gw).transpose(2, 3)
        return F.pad(out, (0, 0, p, 0)) if p else out

    def finish(self, host, out, branch):
        return out / math.sqrt(out.shape[1]) if self.div_heads else out
