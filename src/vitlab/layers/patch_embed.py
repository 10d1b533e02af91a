"""Patch embeddings: linear patchify (``patch``) and a convolutional stem (``conv``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from vitlab.registry import Registry

__all__ = ["EMBEDS", "PatchEmbed", "ConvStem", "to_2tuple"]

EMBEDS = Registry("patch embedding")


def to_2tuple(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping ``patch_size`` patches and project each linearly
    (a strided conv), "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021).
    Output ``(B, N, C)`` tokens in raster order; ``grid_size`` is the token map.  Names match timm."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Optional[nn.Module] = None, bias: bool = True, dynamic_img_size: bool = False):
        super().__init__()
        self.dynamic_img_size = dynamic_img_size  # any size divisible by the patch: forward -> (tokens, hw)
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p != 0:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer if norm_layer is not None else nn.Identity()

    def check(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if self.dynamic_img_size and h % self.patch_size[0] == 0 and w % self.patch_size[1] == 0:
            return
        if self.dynamic_img_size:
            raise ValueError(f"input image size {h}x{w} is not divisible by the patch size "
                             f"{self.patch_size[0]}x{self.patch_size[1]}")
        if (h, w) != self.img_size:
            hint = ("" if h % self.patch_size[0] == 0 and w % self.patch_size[1] == 0 else
                    f"; {h}x{w} is not even divisible by the patch size {self.patch_size[0]}x{self.patch_size[1]}")
            raise ValueError(f"input image size {h}x{w} does not match the model's img_size "
                             f"{self.img_size[0]}x{self.img_size[1]}{hint}; create the model with img_size={h}")

    def forward(self, x: torch.Tensor):
        """``(B, C, H, W)`` -> ``(B, N, C')`` tokens (``(tokens, grid)`` with ``dynamic_img_size``)."""
        self.check(x)
        x = self.proj(x)
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return (tokens, tuple(x.shape[-2:])) if self.dynamic_img_size else tokens


class ConvStem(PatchEmbed):
    """Convolutional stem: ``log2(patch_size)`` stride-2 3x3 conv + BatchNorm + ReLU layers,
    then a 1x1 projection, as in "Early Convolutions Help Transformers See Better" (Xiao et al.,
    NeurIPS 2021).  Same token grid as the linear patchify it replaces."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Optional[nn.Module] = None, bias: bool = True, dynamic_img_size: bool = False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, norm_layer, bias, dynamic_img_size)
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p & (p - 1) or p < 2:
            raise ValueError(f"ConvStem needs a square power-of-two patch size >= 2, got {self.patch_size}")
        n = p.bit_length() - 1
        layers, c_in = [], in_chans
        for i in range(n):
            c_out = max(embed_dim // 2 ** (n - i), 16)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)


class DeepViTStem(PatchEmbed):
    """DeepViT's convolutional patch embedding (``use_cnn_embed`` of the official code of "DeepViT: Towards
    Deeper Vision Transformer", Zhou et al., 2021, following T2T): 7x7 stride-2 conv (64 channels, no bias) +
    BN + ReLU, 3x3 conv (64, no bias) + BN + ReLU, then a ``patch/2`` strided conv to ``embed_dim`` (``proj``)."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Optional[nn.Module] = None, bias: bool = True, dynamic_img_size: bool = False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, norm_layer, bias, dynamic_img_size)
        if self.patch_size[0] % 2 or self.patch_size[1] % 2:
            raise ValueError(f"the DeepViT stem needs an even patch size (a stride-2 conv first), got {self.patch_size}")
        self.conv1, self.bn1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        half = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(64, embed_dim, half, stride=half, bias=bias)

    def forward(self, x: torch.Tensor):
        self.check(x)
        x = self.proj(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return (tokens, tuple(x.shape[-2:])) if self.dynamic_img_size else tokens


EMBEDS.register("patch")(PatchEmbed)
EMBEDS.register("conv")(ConvStem)
EMBEDS.register("deepvit_conv")(DeepViTStem)
