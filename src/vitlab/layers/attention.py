"""Named presets of :class:`~vitlab.layers.mha.MultiHeadAttention` with the constructor signatures of
timm's ``Attention`` (``Attention``), LipsFormer's cosine attention (``CosineAttention``) and FLatten's
focused linear attention (``FocusedLinearAttention``).  Backbones build attention from parts; these
are for using one attention on its own."""
from __future__ import annotations

from typing import Optional

from vitlab.layers.layout import TokenLayout
from vitlab.layers.mha import MultiHeadAttention
from vitlab.layers.modifiers import AttnScale

__all__ = ["Attention", "CosineAttention", "FocusedLinearAttention", "AttnScale"]


class Attention(MultiHeadAttention):
    """Multi-head softmax self-attention (ViT; timm's ``Attention``: ``qkv``, ``q_norm``, ``k_norm``,
    ``proj``), optional qk-norm and AttnScale (``attn_scale.omega``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_scale: bool = False,
                 layout: Optional[TokenLayout] = None):
        super().__init__(dim, num_heads, core="softmax", modifiers=("attnscale",) if attn_scale else (),
                         qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop, proj_drop=proj_drop, layout=layout)


class CosineAttention(MultiHeadAttention):
    """Scaled cosine attention (LipsFormer, Qi et al., ICLR 2023): the ``cosine`` core."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_scale: bool = False, tau: float = 10.0, learn_tau: bool = False,
                 normalize_v: bool = False, eps: float = 0.0, layout: Optional[TokenLayout] = None):
        super().__init__(dim, num_heads, core="cosine", modifiers=("attnscale",) if attn_scale else (),
                         qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, tau=tau, learn_tau=learn_tau,
                         normalize_v=normalize_v, eps=eps, layout=layout)


class FocusedLinearAttention(MultiHeadAttention):
    """Focused linear attention (FLatten, Han et al., ICCV 2023): the ``focused_linear`` core.
    ``num_tokens`` (or ``layout``) sizes the key position encoding; without it there is none."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, focusing_factor: float = 3.0, kernel_size: int = 5,
                 num_tokens: Optional[int] = None, layout: Optional[TokenLayout] = None):
        super().__init__(dim, num_heads, core="focused_linear", qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, focusing_factor=focusing_factor, kernel_size=kernel_size,
                         layout=layout, num_tokens=num_tokens)
