"""Normalisation parts, selectable by name: ``layernorm``, ``center``, ``rms``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.registry import Registry

__all__ = ["NORMS", "CenterNorm", "RMSNorm", "create_norm"]

NORMS = Registry("norm")


class CenterNorm(nn.Module):
    """CenterNorm: ``gamma * D/(D-1) * (x - mean(x)) + beta`` over the last axis.

    From "LipsFormer: Introducing Lipschitz Continuity to Vision Transformers"
    (Qi et al., ICLR 2023).  No division by the standard deviation, hence Lipschitz with
    constant ``D/(D-1) * max|gamma|``; ``eps`` is accepted for drop-in compatibility and ignored.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        if dim < 2:
            raise ValueError(f"CenterNorm needs dim >= 2 (it scales by D/(D-1)), got dim={dim}")
        self.dim = dim
        self.scale = dim / (dim - 1)
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(dim=-1, keepdim=True)) * self.scale
        if self.weight is not None:
            x = torch.addcmul(self.bias, x, self.weight)
        return x

    def lipschitz_constant(self) -> float:
        w = self.weight.abs().max().item() if self.weight is not None else 1.0
        return self.scale * w

    def extra_repr(self) -> str:
        return f"{self.dim}"


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` ("Root Mean Square Layer Normalization", Zhang & Sennrich, NeurIPS 2019) that normalises a
    lower-precision input in its weight's dtype: under autocast a bf16 / fp16 activation meets a float32 weight,
    which torch's ``rms_norm`` (not on autocast's float32 list, unlike ``layer_norm``) serves off its fused kernel
    with a warning; here it runs in float32 and returns float32, as autocast's LayerNorm does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and x.dtype != self.weight.dtype and x.is_floating_point():
            return F.rms_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.eps)
        return super().forward(x)


NORMS.register("layernorm")(nn.LayerNorm)
NORMS.register("center")(CenterNorm)
NORMS.register("rms")(RMSNorm)


def create_norm(name: Optional[str], dim: int, eps: float = 1e-6) -> nn.Module:
    """Build a norm by name over the channel (last) axis; ``None``: no norm (blocks whose branches carry their
    own norms, as LeViT's)."""
    if name is None:
        return nn.Identity()
    return NORMS.get(name)(dim, eps=eps)
