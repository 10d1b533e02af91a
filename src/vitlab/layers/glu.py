"""Gated channel mixer ``swiglu_packed`` (:data:`~vitlab.layers.mlp.CHANNEL_MIXERS`).

SwiGLU ("GLU Variants Improve Transformer", Shazeer, 2020, sec. 2: ``FFN_SwiGLU(x) = (Swish(x W) * x V) W2``)
with ``W`` and ``V`` packed in one ``fc1`` whose first half of outputs is the gated (Swish) one, as DINOv2's
giant ViT (Oquab et al., TMLR 2024) and timm's ``SwiGLUPacked`` (``GluMlp(gate_last=False)``): built as
``cls(dim, hidden, drop=...)`` like every channel mixer, ``hidden`` being ``fc1``'s width (both halves), so
``fc2`` reads ``hidden // 2`` channels.  Names are timm's (``fc1``, ``act``, ``norm``, ``fc2``).
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.linear import Linear
from vitlab.layers.mlp import CHANNEL_MIXERS

__all__ = ["SwiGLUPacked"]


@CHANNEL_MIXERS.register("swiglu_packed")
class SwiGLUPacked(nn.Module):
    """``fc2(act(a) * b)`` with ``(a, b) = fc1(x)`` split in halves, ``act`` SiLU (see the module docstring)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.SiLU, bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or 2 * in_features
        if hidden_features % 2:
            raise ValueError(f"swiglu_packed needs an even hidden width (two halves of fc1), got {hidden_features}")
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()  # timm's optional norm of the gated hidden (a key-free placeholder)
        self.fc2 = Linear(hidden_features // 2, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """``(B, N, C)`` tokens; ``layout`` is accepted (and not needed) as by every channel mixer."""
        gated, value = self.fc1(x).chunk(2, dim=-1)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(gated) * value))))
