"""The parts XCiT adds besides its attention core: local patch interaction, the Fourier-feature position
encoding and the convolutional patch stem.

"XCiT: Cross-Covariance Image Transformers" (El-Nouby et al., NeurIPS 2021): sec. 3.3 (LPI, the conv
patch stem) and sec. 4 / the official code (the Fourier position encoding of "Attention Is All You Need",
Vaswani et al., 2017, and DETR, Carion et al., 2020, projected by a 1x1 conv).  Names are timm's
(``conv1``, ``bn``, ``conv2``; ``token_projection``; ``proj.{i}.{0,1}``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout, as_layout
from vitlab.layers.patch_embed import EMBEDS, PatchEmbed

__all__ = ["LocalPatchInteraction", "FourierPositionEncoding", "XcitConvStem"]


class LocalPatchInteraction(nn.Module):
    """LPI (sec. 3.3): depthwise ``k x k`` conv, GELU, BatchNorm, depthwise ``k x k`` conv on the token map,
    so that tokens talk to their neighbours (XCA mixes channels, not tokens).  ``forward(x, layout)``:
    ``(B, P + h*w, C) -> (B, P + h*w, C)``, zero for the prefix tokens (a residual branch keeps them)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        layout = layout or as_layout(x.shape[1])
        y = layout.from_map(self.conv2(self.bn(self.act(self.conv1(layout.to_map(x))))))
        p = layout.num_prefix
        return torch.cat([x.new_zeros(x.shape[0], p, x.shape[2]), y], dim=1) if p else y


class FourierPositionEncoding(nn.Module):
    """Fourier features of the normalised (row, column) position, ``hidden_dim`` per axis (sin and cos at
    ``temperature ** (2 floor(i/2) / hidden_dim)``), projected to ``dim`` by a 1x1 conv
    (``token_projection``).  Computed for any map, so the model takes any input size (timm's
    ``PositionalEncodingFourier``)."""

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0):
        super().__init__()
        if hidden_dim < 2 or hidden_dim % 2:
            raise ValueError(f"hidden_dim must be an even number >= 2, got {hidden_dim}")
        self.dim, self.hidden_dim, self.temperature = dim, hidden_dim, temperature
        self.token_projection = nn.Conv2d(2 * hidden_dim, dim, kernel_size=1)

    def features(self, hw: Tuple[int, int], device=None) -> torch.Tensor:
        """The ``(2 * hidden_dim, h, w)`` sin/cos features (row features first), float32."""
        h, w = hw
        freq = self.temperature ** (2 * (torch.arange(self.hidden_dim, device=device) // 2) / self.hidden_dim)

        def axis(n: int) -> torch.Tensor:  # positions 1..n scaled to (0, 2 pi], then interleaved sin / cos
            pos = torch.arange(1, n + 1, device=device, dtype=torch.float32) / (n + 1e-6) * (2 * math.pi)
            arg = pos[:, None] / freq
            return torch.stack([arg[:, 0::2].sin(), arg[:, 1::2].cos()], dim=-1).flatten(1)  # (n, hidden)

        rows = axis(h).t()[:, :, None].expand(-1, h, w)
        cols = axis(w).t()[:, None, :].expand(-1, h, w)
        return torch.cat([rows, cols], dim=0)

    def forward(self, hw: Tuple[int, int]) -> torch.Tensor:
        """``(1, h*w, dim)`` position codes of an ``h x w`` token map."""
        weight = self.token_projection.weight
        feats = self.features(hw, weight.device).to(weight.dtype)
        return self.token_projection(feats[None]).flatten(2).transpose(1, 2)


class XcitConvStem(PatchEmbed):
    """XCiT's patch stem (sec. 3.3): ``log2(patch_size)`` 3x3 stride-2 convs, each followed by BatchNorm,
    with GELU between them; widths double up to ``embed_dim`` (4 convs for 16x16 patches, 3 for 8x8).
    ``proj.{2i}`` is conv ``i`` (``.0`` conv, ``.1`` BN), as timm's ``ConvPatchEmbed``."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Optional[nn.Module] = None, bias: bool = True, dynamic_img_size: bool = False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, norm_layer, bias, dynamic_img_size)
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p < 2 or p & (p - 1):
            raise ValueError(f"the XCiT stem needs a square power-of-two patch size >= 2, got {self.patch_size}")
        n = p.bit_length() - 1
        if embed_dim % 2 ** (n - 1):
            raise ValueError(f"embed_dim {embed_dim} must be divisible by {2 ** (n - 1)} for {p}x{p} patches")
        layers, c_in = [], in_chans
        for i in range(n):
            c_out = embed_dim // 2 ** (n - 1 - i)
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(c_out)))
            c_in = c_out
        self.proj = nn.Sequential(*layers)


EMBEDS.register("xcit_conv")(XcitConvStem)
