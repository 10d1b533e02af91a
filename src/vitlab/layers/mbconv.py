"""The MBConv block with squeeze-excitation, and the convolution pieces it needs.

MBConv is MobileNetV2's inverted bottleneck (Sandler et al., CVPR 2018) with squeeze-excitation ("Squeeze-and-
Excitation Networks", Hu, Shen & Sun, CVPR 2018) as EfficientNet uses it (Tan & Le, ICML 2019); MaxViT (Tu et
al., ECCV 2022, sec. 3.3) opens each of its blocks with one, pre-normalised: ``x + Proj(SE(DW(Expand(BN(x)))))``,
and a strided one downsamples with a shortcut of 2x2 average pooling plus a 1x1 conv.  ``padding="same"`` is
TensorFlow's SAME padding (asymmetric for a strided conv), so weights trained in TensorFlow (the official MaxViT
release) give the same maps.  Names are timm's (``pre_norm``, ``conv1_1x1``, ``norm1``, ``conv2_kxk``,
``norm2``, ``se.fc1``, ``se.fc2``, ``conv3_1x1``, ``shortcut.expand``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["same_pad", "SameConv2d", "BatchNormAct2d", "SqueezeExcite", "PoolShortcut", "MBConv", "make_divisible"]


def make_divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to a multiple of ``divisor``, never below 90 % of ``v`` (MobileNetV2's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's SAME padding of a ``(B, C, H, W)`` map for a ``kernel`` / ``stride`` window: output size
    ``ceil(H / stride)``, the extra pixel of an odd total on the bottom / right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class SameConv2d(nn.Conv2d):
    """A conv with TensorFlow's SAME padding: symmetric and static for stride 1 (odd kernel), computed per
    input otherwise.  An ``nn.Conv2d`` (keys ``weight``, ``bias``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = True):
        self.dynamic = stride > 1 or kernel % 2 == 0
        super().__init__(in_chs, out_chs, kernel, stride=stride, padding=0 if self.dynamic else kernel // 2,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            x = same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm then an activation (none with ``act=None``); a ``BatchNorm2d`` (its keys)."""

    def __init__(self, chs: int, eps: float = 1e-5, act: Optional[nn.Module] = None):
        super().__init__(chs, eps=eps)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (Hu et al., CVPR 2018): ``x * sigmoid(fc2(SiLU(fc1(mean_hw(x)))))`` with 1x1 convs
    ``fc1`` (``chs -> rd``) and ``fc2``, both with bias."""

    def __init__(self, chs: int, rd: int):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, rd, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class PoolShortcut(nn.Module):
    """The shortcut of a strided MBConv: 2x2 stride-2 average pooling (SAME, zeros counted) then a 1x1 conv
    ``expand`` when the width changes (timm's ``Downsample2d``)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.expand = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(F.avg_pool2d(same_pad(x, 2, 2), 2, 2))


class MBConv(nn.Module):
    """Pre-norm MBConv with squeeze-excitation on ``(B, C, H, W)`` maps (see the module docstring):
    ``shortcut(x) + DropPath(conv3_1x1(se(norm2(conv2_kxk(norm1(conv1_1x1(pre_norm(x))))))))``.

    ``expand_ratio`` sizes the hidden width from the *output* width (rounded to a multiple of 8), ``se_ratio``
    the squeeze width from the output width (the official code's choice); the depthwise ``kernel`` conv carries
    the ``stride``; BatchNorm ``eps`` and the activation (``act``: a module class) are the caller's."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 4.0, se_ratio: float = 0.25,
                 kernel: int = 3, eps: float = 1e-3, act: type = nn.GELU, drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath

        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        mid = make_divisible(out_chs * expand_ratio)
        self.shortcut = PoolShortcut(in_chs, out_chs) if stride == 2 else nn.Identity()
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"an MBConv of stride 1 keeps the width; got {in_chs} -> {out_chs} channels")
        self.pre_norm = BatchNormAct2d(in_chs, eps)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = BatchNormAct2d(mid, eps, act())
        self.conv2_kxk = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self.norm2 = BatchNormAct2d(mid, eps, act())
        self.se = SqueezeExcite(mid, int(se_ratio * out_chs))
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        s = self.conv2_kxk.stride[0]
        return tuple(math.ceil(r / s) for r in hw)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        y = self.conv3_1x1(self.se(self.norm2(self.conv2_kxk(y))))
        return self.shortcut(x) + self.drop_path(y)
