"""Linear layers that carry their own norm, LeViT's building unit (DESIGN.md, "projection", "channel mixer").

"LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference" (Graham, El-Nouby, Touvron, Stock,
Joulin, Jegou and Douze, ICCV 2021, sec. 4.2): every Linear of attention and MLP is followed by a BatchNorm
(it folds into the Linear at inference), there is no LayerNorm before the residual branches, and the classifier
is BatchNorm then Linear.  Here:

* :class:`TokenBatchNorm`: BatchNorm over the channel (last) axis of ``(..., C)`` tokens, statistics over every
  token of the batch; :func:`channel_norm` builds it for ``"batchnorm"`` and any :data:`NORMS` name otherwise;
* :class:`LinearNorm` (``linear`` + ``bn``), :class:`ConvNorm` (the conv stem's unit) and :class:`NormLinear`
  (``bn`` + ``drop`` + ``linear``, the classifier), named as timm's;
* projection ``linear_norm`` (:class:`LinearNormProjection`): q, k, v from LinearNorms with per-head interleaved
  ``[q, k, v]`` channels and values ``value_dim`` wide, the output projection hard-swish + LinearNorm;
* channel mixer ``linear_norm`` (:class:`LinearNormMlp`): LinearNorm, hard-swish, LinearNorm.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Type

import torch
from torch import nn

from vitlab.layers.attn_parts import PROJECTIONS
from vitlab.layers.linear import Linear
from vitlab.layers.mlp import CHANNEL_MIXERS
from vitlab.layers.norm import create_norm
from vitlab.layers.projection import _Projection

__all__ = ["TokenBatchNorm", "channel_norm", "LinearNorm", "ConvNorm", "NormLinear", "LinearNormProjection",
           "LinearNormMlp"]


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last axis of ``(..., C)`` tokens (LeViT, Graham et al., ICCV 2021, sec. 4.2): every
    token of every image is one sample of the channel statistics (as timm's ``LinearNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def channel_norm(name: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``"batchnorm"``: :class:`TokenBatchNorm`; any other name: that :data:`~vitlab.layers.NORMS` norm."""
    return TokenBatchNorm(dim, eps) if name == "batchnorm" else create_norm(name, dim, eps=eps)


def _init_norm(norm: nn.Module, weight: float) -> None:
    # the branch-closing norms start at 0 so every residual branch starts as the identity (official code)
    if isinstance(getattr(norm, "weight", None), torch.Tensor):
        nn.init.constant_(norm.weight, weight)


class LinearNorm(nn.Module):
    """A bias-free Linear then a channel norm (``linear``, ``bn``; LeViT, sec. 4.2); ``norm_init`` is the norm's
    initial scale (0 for the last layer of a residual branch)."""

    def __init__(self, in_features: int, out_features: int, norm: str = "batchnorm", norm_init: float = 1.0,
                 eps: float = 1e-5):
        super().__init__()
        self.linear = Linear(in_features, out_features, bias=False)
        self.bn = channel_norm(norm, out_features, eps)
        _init_norm(self.bn, norm_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class ConvNorm(nn.Module):
    """A bias-free conv then BatchNorm2d on a ``(B, C, H, W)`` map (``linear``, ``bn``; LeViT's conv stem)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 3, stride: int = 2, padding: int = 1):
        super().__init__()
        self.linear = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class NormLinear(nn.Module):
    """LeViT's classifier (sec. 4.2): a channel norm, dropout, then a Linear (trunc-normal 0.02, zero bias);
    ``use_norm=False`` leaves the norm out (a plain Linear head).  Names as timm's (``bn``, ``drop``, ``linear``)."""

    def __init__(self, in_features: int, out_features: int, norm: str = "batchnorm", drop: float = 0.0,
                 use_norm: bool = True, eps: float = 1e-5):
        super().__init__()
        self.bn = channel_norm(norm, in_features, eps) if use_norm else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.linear = Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


@PROJECTIONS.register("linear_norm")
class LinearNormProjection(_Projection):
    """LeViT's projections (Graham et al., ICCV 2021, sec. 4.2): one LinearNorm ``qkv`` whose output holds, head
    after head, ``[q (head_dim), k (head_dim), v (value_dim)]``; where the grouping's keys are not the queries
    (LeViT's subsampling attention), ``q.ln`` for the queries and ``kv`` (``[k, v]`` per head) for the rest.  Values
    are ``host.value_dim`` wide per head (LeViT: ``attn_ratio`` x the key width).  The output projection is
    hard-swish (``act_layer``: timm's SiLU variants) then a LinearNorm ``proj.act``, ``proj.ln`` (its norm starts at
    0 with ``zero_out``).  Names as timm's ``levit.Attention`` / ``AttentionDownsample``; ``proj_norm`` picks the
    norm of every LinearNorm."""

    sizes_values = True  # reads host.value_dim: values may be wider than queries and keys

    def __init__(self, proj_norm: str = "batchnorm", zero_out: bool = True, act_layer: Type[nn.Module] = nn.Hardswish):
        self.proj_norm, self.zero_out, self.act_layer = proj_norm, zero_out, act_layer

    def setup(self, host) -> None:
        h, d, dv = host.num_heads, host.head_dim, host.value_dim
        if host.grouping.keys_are_queries:
            host.qkv = LinearNorm(host.dim, h * (2 * d + dv), self.proj_norm)
        else:
            host.q = nn.Sequential(OrderedDict(ln=LinearNorm(host.dim, h * d, self.proj_norm)))
            host.kv = LinearNorm(host.dim, h * (d + dv), self.proj_norm)

    def __call__(self, host, xq, xkv):
        h, d, dv = host.num_heads, host.head_dim, host.value_dim
        if hasattr(host, "qkv"):
            q, k, v = host.qkv(xq).unflatten(-1, (h, -1)).split([d, d, dv], dim=-1)
            if xq is not xkv:  # queries and keys from different tokens: the same weights on each
                _, k, v = host.qkv(xkv).unflatten(-1, (h, -1)).split([d, d, dv], dim=-1)
        else:
            q = host.q(xq).unflatten(-1, (h, d))
            k, v = host.kv(xkv).unflatten(-1, (h, -1)).split([d, dv], dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, host, bias: bool = True) -> nn.Module:
        """The output projection ``(B, N, heads * value_dim) -> (B, N, out_dim)`` (its norm's shift is the bias)."""
        return nn.Sequential(OrderedDict(act=self.act_layer(), ln=LinearNorm(
            host.value_inner, host.out_dim, self.proj_norm, norm_init=0.0 if self.zero_out else 1.0)))


@CHANNEL_MIXERS.register("linear_norm")
class LinearNormMlp(nn.Module):
    """LeViT's MLP (Graham et al., ICCV 2021, sec. 4.2): LinearNorm ``ln1`` (expansion), hard-swish, dropout,
    LinearNorm ``ln2`` whose norm starts at 0.  Names as timm's ``LevitMlp``."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 drop: float = 0.0, act_layer: Type[nn.Module] = nn.Hardswish, norm: str = "batchnorm"):
        super().__init__()
        hidden = hidden_features or in_features
        self.ln1 = LinearNorm(in_features, hidden, norm)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.ln2 = LinearNorm(hidden, out_features or in_features, norm, norm_init=0.0)

    def forward(self, x: torch.Tensor, layout=None) -> torch.Tensor:
        """``(B, N, C)`` tokens; ``layout`` is accepted (and not needed) as by every channel mixer."""
        return self.ln2(self.drop(self.act(self.ln1(x))))
