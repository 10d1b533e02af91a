"""Multi-head bidirectional cross-attention (MHBC) with one shared attention matrix.

"LookupViT: Compressing visual information to a limited number of tokens" (Koner, Jain, Jain, Tresp & Paul,
ECCV 2024, sec. 3.2).  Two token sets exchange information through one set of logits
``A = (x_p W_q)(x_l W_k)^T / sqrt(d)`` (per head, ``M x N``):

* gathering, ``p <- l``: ``softmax(A) (x_l W_v) W_o``, every compressed token reads the lookup tokens;
* propagation, ``l <- p``: ``softmax(A^T) (x_p W_v') W_o'``, every lookup token reads the compressed tokens with
  the *same* logits transposed (no second ``q k^T``), normalised over the compressed tokens.

Names: ``q``, ``k``, ``v``, ``proj`` (gathering) and ``v_rev``, ``proj_rev`` (propagation).  Recording
(:func:`~vitlab.layers.record_attention`) hands out both probability maps, ``(B, h, M, N)`` then ``(B, h, N, M)``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from vitlab.layers.linear import Linear
from vitlab.layers.projection import split_heads
from vitlab.layers.recording import RecordsAttention

__all__ = ["BidirectionalCrossAttention"]


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


class BidirectionalCrossAttention(RecordsAttention, nn.Module):
    """MHBC (Koner et al., ECCV 2024, sec. 3.2); see the module docstring.  :meth:`gather` returns the
    compressed tokens' update and the logits that :meth:`propagate` reuses."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.k, self.v = (Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.v_rev = Linear(dim, dim, bias=qkv_bias)
        self.proj, self.proj_rev = Linear(dim, dim), Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(attn_drop), nn.Dropout(proj_drop)

    def gather(self, xp: torch.Tensor, xl: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Compressed ``xp (B, M, C)`` read lookup ``xl (B, N, C)``: ``(update (B, M, C), logits (B, h, M, N))``."""
        h = self.num_heads
        q, k, v = split_heads(self.q(xp), h), split_heads(self.k(xl), h), split_heads(self.v(xl), h)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        return self._out(logits, v, self.proj), logits

    def propagate(self, xp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The lookup tokens read the compressed ``xp`` through the gathering ``logits`` transposed: ``(B, N, C)``
        (their queries are the shared logits' keys, so no lookup input is needed)."""
        return self._out(logits.transpose(-2, -1), split_heads(self.v_rev(xp), self.num_heads), self.proj_rev)

    def _out(self, logits: torch.Tensor, v: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        self._record(probs)
        return self.proj_drop(proj(_merge(self.attn_drop(probs) @ v)))
