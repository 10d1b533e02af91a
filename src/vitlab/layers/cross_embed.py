"""CrossFormer's cross-scale embedding layer (CEL): a stem and a downsampler in one.

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang et al., ICLR 2022),
sec. 3.1: several convolutions with the same stride and kernels of different sizes (4, 8, 16, 32 in the
stem; 2, 4 between stages) sample patches of several scales around the same centre; their outputs are
concatenated along the channels, so each token carries several scales.  Larger kernels get fewer channels:
kernel ``i`` (ascending) gets ``dim / 2^(i+1)``, the last the remainder (the paper's Table 1 and official
code).  Padding is ``(kernel - stride) // 2``, so every kernel gives the same map.

As in the official code the stem normalises its output (``norm_first=False``) and the downsamplers between
stages normalise their input (``norm_first=True``, the official ``PatchMerging``).  Convs are ``projs.{i}``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.norm import create_norm

__all__ = ["CrossScaleEmbed", "cross_scale_dims"]


def cross_scale_dims(out_dim: int, n: int) -> List[int]:
    """Channels of each of ``n`` kernels (ascending size): ``out_dim // 2^(i+1)``, the last ``out_dim // 2^(n-1)``
    (so they sum to ``out_dim`` when it is divisible by ``2^(n-1)``), as the official code."""
    return [out_dim // 2 ** (i + 1) if i < n - 1 else out_dim // 2 ** i for i in range(n)]


class CrossScaleEmbed(nn.Module):
    """``kernels`` convs of stride ``stride`` whose outputs are concatenated (see the module docstring).

    Called on an image ``(B, C, H, W)`` (the stem) or on tokens with their layout (a downsampler), it returns
    ``(tokens (B, N, out_dim), (h, w))``."""

    def __init__(self, in_chans: int, out_dim: int, kernels: Sequence[int], stride: int, norm: str = "layernorm",
                 norm_eps: float = 1e-5, norm_first: bool = False):
        super().__init__()
        kernels = sorted(int(k) for k in kernels)
        if not kernels or kernels[0] < stride or any((k - stride) % 2 for k in kernels):
            raise ValueError(f"cross-scale kernels {tuple(kernels)} must be >= the stride {stride} and differ from "
                             "it by an even number (so that every kernel gives the same map)")
        dims = cross_scale_dims(out_dim, len(kernels))
        if sum(dims) != out_dim or min(dims) < 1:
            raise ValueError(f"out_dim {out_dim} cannot be split over {len(kernels)} kernels as {dims}; use a "
                             f"multiple of {2 ** (len(kernels) - 1)}")
        self.kernels, self.stride, self.norm_first = tuple(kernels), stride, norm_first
        self.norm = create_norm(norm, in_chans if norm_first else out_dim, eps=norm_eps)
        self.projs = nn.ModuleList([nn.Conv2d(in_chans, d, k, stride=stride, padding=(k - stride) // 2)
                                    for k, d in zip(kernels, dims)])

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        k, p = self.kernels[0], (self.kernels[0] - self.stride) // 2
        return tuple((s + 2 * p - k) // self.stride + 1 for s in hw)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None):
        if layout is not None:
            x = layout.to_map(self.norm(x) if self.norm_first else x)
        elif self.norm_first:
            raise ValueError("a cross-scale embedding with norm_first normalises tokens: pass their layout")
        fm = torch.cat([conv(x) for conv in self.projs], dim=1)
        tokens = fm.flatten(2).transpose(1, 2)
        return (tokens if self.norm_first else self.norm(tokens)), tuple(fm.shape[-2:])
