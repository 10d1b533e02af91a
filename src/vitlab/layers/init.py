"""Weight initialisers, selectable by name: ``trunc_normal`` (default), ``xavier``, ``spectral``."""
from __future__ import annotations


import torch
from torch import nn

from vitlab.registry import Registry

__all__ = ["INITS", "init_weights", "spectral_init_", "spectral_norm_of", "conv_fan_out_init_"]

INITS = Registry("init")


def spectral_norm_of(weight: torch.Tensor) -> torch.Tensor:
    """Largest singular value of a Linear weight, or of a conv weight reshaped to ``[out, in/g*kh*kw]``."""
    return torch.linalg.matrix_norm(weight.detach().flatten(1).float(), ord=2)


@INITS.register("trunc_normal")
def trunc_normal_init_(module: nn.Module, std: float = 0.02) -> None:
    """timm/DeiT ViT init (timm's ``init_weights_vit_timm``): Linear weights ``trunc_normal_(std=0.02)``, biases 0.

    As timm's call, the truncation is at +-2 in absolute value (torch's defaults ``a=-2, b=2``), i.e. 100 sigma:
    in effect N(0, 0.02).  (Truncating at +-2 sigma instead would give a std of 0.0176.)"""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@INITS.register("xavier")
def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases (Glorot & Bengio, 2010; the original ViT)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@INITS.register("spectral")
@torch.no_grad()
def spectral_init_(module: nn.Module) -> None:
    """LipsFormer spectral init ("LipsFormer", Qi et al., ICLR 2023, section 3 of the spec).

    For every Linear and Conv2d: Xavier-normal weight, Linear bias 0 (conv biases keep
    PyTorch's default), then divide the weight by its largest singular value (conv weights
    reshaped to ``[out, in/g*kh*kw]``), so each has spectral norm exactly 1.  Idempotent in
    the sense that re-running keeps sigma_1 = 1.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            m.weight.div_(spectral_norm_of(m.weight).to(m.weight.dtype))


def init_weights(module: nn.Module, name: str = "trunc_normal", conv_fan_out: bool = False) -> None:
    """Apply the named initialiser to every Linear (and, for ``spectral``, Conv2d) of ``module``; with
    ``conv_fan_out`` every Conv2d first gets :func:`conv_fan_out_init_` (the official code of PVTv2, Twins, SepViT,
    ScalableViT, MaxViT and MobileViT)."""
    if conv_fan_out:
        conv_fan_out_init_(module)
    INITS.get(name)(module)


@torch.no_grad()
def conv_fan_out_init_(module: nn.Module) -> None:
    """Every ``Conv2d`` of ``module``: weights normal with std ``sqrt(2 / fan_out)`` (He et al., 2015, fan-out
    mode; ``fan_out`` divided by the groups), bias zero -- the conv init of PVTv2's and Twins' official code."""
    import math

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
