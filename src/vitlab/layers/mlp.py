"""The transformer MLP (feed-forward) part."""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from vitlab.layers.inplace import INPLACE_ACTIVATIONS, activate, chunkable

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout ("Attention Is All You Need",
    Vaswani et al., 2017; as in ViT, Dosovitskiy et al., ICLR 2021).  Names match timm's.

    Without autograd (``vitlab.layers.inplace``) the activation overwrites ``fc1``'s output, and a
    hidden activation larger than ``chunk_bytes`` is computed in row chunks of about
    ``chunk_target`` bytes, written straight into the output: the hidden tensor (4x the tokens'
    size) then never exists whole, and each chunk stays in the cache between the two matmuls.
    """

    chunk_bytes: int = 32 * 1024 * 1024  # chunk the no-autograd path above this hidden size (0: never)
    chunk_target: int = 12 * 1024 * 1024

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

    def forward(self, x, layout=None):
        """``(B, N, C)`` tokens; ``layout`` is accepted (and not needed) as by every channel mixer."""
        # _chunkable first: it is False while tracing, so the size test never becomes a shape guard
        if self._chunkable(x) and 0 < self.chunk_bytes < self._hidden_bytes(x):
            return self._chunked(x)
        # without autograd, the activation overwrites fc1's fresh output (vitlab.layers.inplace)
        return self.drop2(self.fc2(self.drop1(activate(self.act, self.fc1(x), self.fc1))))

    def _hidden_bytes(self, x: torch.Tensor) -> int:
        return x.numel() // max(x.shape[-1], 1) * self.fc1.out_features * x.element_size()

    def _chunkable(self, x: torch.Tensor) -> bool:
        drops_off = not self.training or (self.drop1.p == 0 and self.drop2.p == 0)
        return (drops_off and type(self.act) in INPLACE_ACTIVATIONS
                and chunkable(x, self.fc1, self.act, self.drop1, self.fc2, self.drop2))

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        pieces = -(-rows * self.fc1.out_features * x.element_size() // self.chunk_target)
        step = -(-rows // pieces)
        out = x2.new_empty(rows, self.fc2.out_features)
        act_ = INPLACE_ACTIVATIONS[type(self.act)]  # _chunkable checked that it is safe
        for s in range(0, rows, step):
            h = act_(self.act, self.fc1(x2[s:s + step]))
            if self.fc2.bias is None:
                torch.mm(h, self.fc2.weight.t(), out=out[s:s + step])
            else:
                torch.addmm(self.fc2.bias, h, self.fc2.weight.t(), out=out[s:s + step])
        return out.reshape(*x.shape[:-1], self.fc2.out_features)
