"""The transformer MLP (feed-forward) part."""
from __future__ import annotations

from typing import Optional, Type

from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout ("Attention Is All You Need",
    Vaswani et al., 2017; as in ViT, Dosovitskiy et al., ICLR 2021).  Names match timm's."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
