"""Multi-head attention pooling (MAP): one learned query per image attends to the image's tokens.

The pooling head of big_vision's ``MAPHead`` and timm's ``AttentionPoolLatent``, used by NaViT (masked per
packed image) and by ViTs with ``global_pool="map"``.
"""
from __future__ import annotations

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.mha import MultiHeadAttention
from vitlab.layers.mlp import Mlp
from vitlab.layers.norm import create_norm

__all__ = ["AttentionPool"]


class AttentionPool(MultiHeadAttention):
    """Multi-head attention pooling (MAP, big_vision's ``MAPHead``; "Set Transformer", Lee et al., ICML 2019),
    masked per image as NaViT's pooling (sec. 2.1): a learned query ``latent`` per image attends to that
    image's tokens only, then ``y + mlp(norm(y))``.  Built from vitlab's attention (``q_kv`` projection,
    ``class_query`` grouping: the queries join as prefix tokens, masked out as keys); names as timm's
    ``AttentionPoolLatent``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm: str = "layernorm",
                 norm_eps: float = 1e-6, qkv_bias: bool = True):
        super().__init__(dim, num_heads, projection="q_kv", grouping="class_query", qkv_bias=qkv_bias)
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = create_norm(norm, dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, image_ids: torch.Tensor, slots: int) -> torch.Tensor:
        """``(S, L, C)`` tokens whose image slots are ``image_ids (S, L)`` -> ``(S, slots, C)``, one per slot."""
        s, n, _ = x.shape
        own = image_ids[:, None, :] == torch.arange(slots, device=x.device)[None, :, None]  # (S, slots, L)
        own = own | ~own.any(-1, keepdim=True)  # a slot without an image reads everything (its output is dropped)
        keys = torch.cat([own.new_zeros(s, slots, slots), own], dim=-1)  # never the queries themselves
        y = super().forward(torch.cat([self.latent.expand(s, slots, -1), x], dim=1),
                            TokenLayout((n,), slots, mask=keys))
        return y + self.mlp(self.norm(y))
