"""Gated channel mixers (:data:`~vitlab.layers.mlp.CHANNEL_MIXERS`): SwiGLU in two weight layouts.

SwiGLU ("GLU Variants Improve Transformer", Shazeer, 2020, sec. 2: ``FFN_SwiGLU(x) = (Swish(x W) * x V) W2``),
each built as ``cls(dim, hidden, drop=...)`` like every channel mixer:

* ``swiglu_packed``: ``W`` and ``V`` packed in one ``fc1`` whose first half of outputs is the gated (Swish) one,
  as DINOv2's giant ViT (Oquab et al., TMLR 2024) and timm's ``SwiGLUPacked`` (``GluMlp(gate_last=False)``);
  ``hidden`` is ``fc1``'s width (both halves), so ``fc2`` reads ``hidden // 2`` channels;
* ``swiglu``: ``W`` and ``V`` as two Linears ``fc1_g`` and ``fc1_x`` (timm's ``SwiGLU``); ``hidden`` is the width of
  each, so ``fc2`` reads ``hidden`` channels;
* ``swiglu_norm``: ``swiglu`` with a LayerNorm (eps 1e-6) on the gated hidden before ``fc2``, the sub-LN of
  EVA-02 ("EVA-02: A Visual Representation for Neon Genesis", Fang et al., 2023, sec. 2; after "Foundation
  Transformers", Wang et al., 2022) that timm's ``Eva`` calls ``scale_mlp``.

Both classes take ``norm`` (a :data:`~vitlab.layers.norm.NORMS` name, or None: none) and ``norm_eps`` for that
norm of the gated hidden.  Names are timm's (``fc1`` or ``fc1_g``/``fc1_x``, ``act``, ``norm``, ``fc2``).
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.linear import Linear
from vitlab.layers.mlp import CHANNEL_MIXERS
from vitlab.layers.norm import create_norm

__all__ = ["SwiGLUPacked", "SwiGLU", "swiglu_norm"]


@CHANNEL_MIXERS.register("swiglu_packed")
class SwiGLUPacked(nn.Module):
    """``fc2(norm(act(a) * b))`` with ``(a, b) = fc1(x)`` split in halves, ``act`` SiLU, ``norm`` none unless asked
    (see the module docstring)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.SiLU, bias: bool = True, drop: float = 0.0,
                 norm: Optional[str] = None, norm_eps: float = 1e-6):
        super().__init__()
        hidden_features = hidden_features or 2 * in_features
        if hidden_features % 2:
            raise ValueError(f"swiglu_packed needs an even hidden width (two halves of fc1), got {hidden_features}")
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = create_norm(norm, hidden_features // 2, eps=norm_eps)  # None: a key-free Identity
        self.fc2 = Linear(hidden_features // 2, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """``(B, N, C)`` tokens; ``layout`` is accepted (and not needed) as by every channel mixer."""
        gated, value = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(gated) * value))))


@CHANNEL_MIXERS.register("swiglu")
class SwiGLU(nn.Module):
    """``fc2(norm(act(fc1_g(x)) * fc1_x(x)))``, ``act`` SiLU, ``norm`` none unless asked (see the module
    docstring); ``hidden`` is the width of each of ``fc1_g`` and ``fc1_x``."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.SiLU, bias: bool = True, drop: float = 0.0,
                 norm: Optional[str] = None, norm_eps: float = 1e-6):
        super().__init__()
        hidden = hidden_features or in_features
        self.fc1_g = Linear(in_features, hidden, bias=bias)
        self.fc1_x = Linear(in_features, hidden, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = create_norm(norm, hidden, eps=norm_eps)  # None: a key-free Identity
        self.fc2 = Linear(hidden, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """``(B, N, C)`` tokens; ``layout`` is accepted (and not needed) as by every channel mixer."""
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


@CHANNEL_MIXERS.register("swiglu_norm")
def swiglu_norm(in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                drop: float = 0.0) -> SwiGLU:
    """:class:`SwiGLU` with EVA-02's sub-LN: a LayerNorm (eps 1e-6, timm's) on the gated hidden before ``fc2``."""
    return SwiGLU(in_features, hidden_features, out_features, drop=drop, norm="layernorm")
