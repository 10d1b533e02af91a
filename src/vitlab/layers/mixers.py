"""Token-mixer registry: ``softmax``, ``cosine``, ``focused_linear``, ``attnscale``.

Every mixer takes ``(x (B, N, C), hw=(H, W), num_prefix=P, bias=None)`` and returns
``(B, N, C)``; backbones build them with :func:`create_mixer`.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from vitlab.layers.attention import Attention, CosineAttention
from vitlab.layers.linear_attention import FocusedLinearAttention
from vitlab.registry import Registry

__all__ = ["MIXERS", "create_mixer"]

MIXERS = Registry("mixer")
MIXERS.register("softmax")(Attention)
MIXERS.register("cosine")(CosineAttention)
MIXERS.register("focused_linear")(FocusedLinearAttention)


@MIXERS.register("attnscale")
def _attnscale(dim: int, num_heads: int = 8, **kwargs: Any) -> nn.Module:
    """Softmax attention with AttnScale (Wang et al., ICLR 2022)."""
    kwargs["attn_scale"] = True
    return Attention(dim, num_heads, **kwargs)


def create_mixer(name: str, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, num_tokens: Optional[int] = None, **mixer_kwargs: Any) -> nn.Module:
    """Build a token mixer by name.  ``mixer_kwargs`` are mixer-specific (``qk_norm``, ``tau``,
    ``focusing_factor``, ``kernel_size``, ``attn_scale``, ...); a mixer ignores what it does
    not use, but an unknown name raises with the closest valid names."""
    return MIXERS.get(name)(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                            proj_drop=proj_drop, num_tokens=num_tokens, **mixer_kwargs)
