"""Channel mixers (:data:`CHANNEL_MIXERS`): the transformer MLP (``mlp``) and LocalViT's depthwise-conv
feed-forward (``localvit``, ``localvit_se``).  Each is built as ``cls(dim, hidden, drop=...)`` and called as
``mixer(x (B, N, C), layout)``."""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from vitlab.layers.inplace import INPLACE_ACTIVATIONS, activate, autocast_on, conv_bn_act, overwritable
from vitlab.layers.layout import TokenLayout, as_layout
from vitlab.layers.linear import Linear, linear_act
from vitlab.registry import Registry

__all__ = ["CHANNEL_MIXERS", "Mlp", "LocalityFeedForward"]

CHANNEL_MIXERS = Registry("channel mixer")


@CHANNEL_MIXERS.register("mlp")
class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout ("Attention Is All You Need",
    Vaswani et al., 2017; as in ViT, Dosovitskiy et al., ICLR 2021).  Names match timm's.

    Without autograd (``vitlab.layers.inplace``) the activation overwrites ``fc1``'s output, and a
    hidden activation larger than ``chunk_bytes`` is computed in row chunks of about
    ``chunk_target`` bytes, written straight into the output: the hidden tensor (4x the tokens'
    size) then never exists whole, and each chunk stays in the cache between the two matmuls.  In float32 on
    the CPU, and under CPU bf16 autocast, ``fc1`` and the activation are one oneDNN call instead
    (``vitlab.layers.linear``), unchunked: with oneDNN's kernels the chunks were slower (ViT-B/16 at batch 16:
    1.05x timm chunked, 1.13x not).
    """

    chunk_bytes: int = 32 * 1024 * 1024  # chunk the no-autograd path above this hidden size (0: never)
    chunk_target: int = 12 * 1024 * 1024

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x, layout=None):
        """``(B, N, C)`` tokens; ``layout`` is accepted (and not needed) as by every channel mixer."""
        # the module checks first: False while tracing, so the size test never becomes a shape guard
        if self._fast(x):
            h = linear_act(self.fc1, self.act, x)  # fc1 + act in one oneDNN call (also under bf16 autocast)
            if h is not None:
                return self.drop2(self.fc2(h))
            if not autocast_on(x) and 0 < self.chunk_bytes < self._hidden_bytes(x):  # _fast: the rest of chunkable
                return self._chunked(x)
        # without autograd, the activation overwrites fc1's fresh output (vitlab.layers.inplace)
        return self.drop2(self.fc2(self.drop1(activate(self.act, self.fc1(x), self.fc1))))

    def _hidden_bytes(self, x: torch.Tensor) -> int:
        return x.numel() // max(x.shape[-1], 1) * self.fc1.out_features * x.element_size()

    def _fast(self, x: torch.Tensor) -> bool:
        """No autograd, no hooks on the modules, no active dropout: fc1 + act may be fused, or chunked."""
        drops_off = not self.training or (self.drop1.p == 0 and self.drop2.p == 0)
        return (drops_off and type(self.act) in INPLACE_ACTIVATIONS
                and overwritable(self.fc1, self.act, self.drop1, self.fc2, self.drop2))

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        pieces = -(-rows * self.fc1.out_features * x.element_size() // self.chunk_target)
        step = -(-rows // pieces)
        out = x2.new_empty(rows, self.fc2.out_features)
        act_ = INPLACE_ACTIVATIONS[type(self.act)]  # _fast checked that it is safe
        for s in range(0, rows, step):
            h = act_(self.act, self.fc1(x2[s:s + step]))
            if self.fc2.bias is None:
                torch.mm(h, self.fc2.weight.t(), out=out[s:s + step])
            else:
                torch.addmm(self.fc2.bias, h, self.fc2.weight.t(), out=out[s:s + step])
        return out.reshape(*x.shape[:-1], self.fc2.out_features)


@CHANNEL_MIXERS.register("localvit")
class LocalityFeedForward(nn.Module):
    """LocalViT's feed-forward ("LocalViT: Bringing Locality to Vision Transformers", Li, Zhang, Cao, Timofte &
    Van Gool, 2021, sec. 3, Fig. 2): on the token map, 1x1 conv (``dim -> hidden``) + BN + act, 3x3 depthwise
    conv + BN + act, optional squeeze-excitation to ``se_channels`` (the paper's "hs+se"), 1x1 conv + BN; convs
    without bias, h-swish by default, as the official code.  Prefix (class) tokens bypass it (their output is 0,
    so the block's residual keeps them), as the official code.  Unlike the official block (no norm before it),
    vitlab's ``Block`` puts its ``norm2`` in front, and the residual is the block's (the official adds it inside).
    Names ``conv1/bn1``, ``conv_dw/bn_dw``, ``se``, ``conv2/bn2``."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 drop: float = 0.0, act_layer: Type[nn.Module] = nn.Hardswish, se_channels: int = 0):
        super().__init__()
        hidden, out = hidden_features or in_features, out_features or in_features
        self.conv1, self.bn1 = nn.Conv2d(in_features, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn_dw, self.act = nn.BatchNorm2d(hidden), act_layer()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, se_channels, 1), nn.ReLU(),
                                nn.Conv2d(se_channels, hidden, 1), nn.Hardsigmoid()) if se_channels else None
        self.drop = nn.Dropout(drop)
        self.conv2, self.bn2 = nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """``(B, P + H*W, C)`` tokens -> ``(B, P + H*W, C')``, zeros for the ``P`` prefix tokens."""
        layout = layout or as_layout(x.shape[1])
        h = conv_bn_act(self.conv1, self.bn1, self.act, layout.to_map(x))  # without autograd: BN folded
        h = conv_bn_act(self.conv_dw, self.bn_dw, self.act, h)
        if self.se is not None:
            h = h * self.se(h)
        y = self.drop(layout.from_map(conv_bn_act(self.conv2, self.bn2, None, self.drop(h))))
        p = layout.num_prefix
        return torch.cat([y.new_zeros(y.shape[0], p, y.shape[2]), y], dim=1) if p else y


@CHANNEL_MIXERS.register("localvit_se")
def localvit_se(in_features: int, hidden_features: Optional[int] = None, drop: float = 0.0) -> LocalityFeedForward:
    """:class:`LocalityFeedForward` with h-swish and an 8-channel squeeze-excitation: LocalViT-T/S ("act3",
    reduction 192/384 of the official code: ``make_divisible(hidden / r, 8) = 8`` channels)."""
    return LocalityFeedForward(in_features, hidden_features, drop=drop, se_channels=8)
