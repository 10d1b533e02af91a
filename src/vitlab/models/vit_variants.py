"""ViT-recipe variants: SimpleViT, DeepViT, the small-dataset ViT (SPT + LSA) and LocalViT.

None of these is in timm under these names; sizes and names are the papers' (or the official code's), and
``tests/test_vit_variants.py`` checks parameter counts against the official code's structure:

* **SimpleViT** ("Better plain ViT baselines for ImageNet-1k", Beyer, Zhai & Kolesnikov, 2022, sec. 2): no
  class token, big_vision's fixed 2-D sin-cos table (``pos_embed="sincos_big_vision"``), the final LayerNorm
  before global average pooling (no ``fc_norm``), zero-initialised head, Xavier-uniform Linears.  vit-pytorch's
  ``SimpleViT`` adds LayerNorms around the patch projection and drops the biases; big_vision (followed here)
  has neither.  Its counts equal timm's ViT without class token and position table.
* **DeepViT** ("DeepViT: Towards Deeper Vision Transformer", Zhou et al., 2021, Table 1 / official code):
  re-attention (``modifiers`` "reattention") in the last blocks only (``block_modifiers``), the official
  code's conv stem (``embed="deepvit_conv"``) and ``scale_adjustment`` (see :class:`DeepViT`).
* **ViT for small-size datasets** ("Vision Transformer for Small-Size Datasets", Lee, Lee & Song, 2021,
  sec. 4.1): depth 9, dim 192, 12 heads of 16, MLP 384, patch 4 at 32 px (8 at 64 px), no qkv bias; with
  shifted patch tokenization (``embed="spt"``) and / or locality self-attention (``modifiers=("lsa",)``).
* **LocalViT** ("LocalViT: Bringing Locality to Vision Transformers", Li et al., 2021): DeiT with the
  depthwise-conv feed-forward (``mlp="localvit_se"``: h-swish + SE, the official ``..._act3_r192/r384``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD
from vitlab.models.base import register_recipe
from vitlab.models.vit import _SIZES, VisionTransformer

__all__ = ["SimpleViT", "DeepViT", "BranchConstant"]


class SimpleViT(VisionTransformer):
    """SimpleViT (Beyer et al., 2022; see the module docstring): a :class:`VisionTransformer` whose defaults
    are the paper's (any of them may be overridden) and whose head starts at zero."""

    def __init__(self, **kwargs: Any):
        for key, value in dict(class_token=False, global_pool="avg", fc_norm=False, pos_embed="sincos_big_vision",
                               init="xavier", architecture="simple_vit").items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        if isinstance(self.head, nn.Linear):  # "head_zeroinit" of big_vision
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()


class BranchConstant(nn.Module):
    """A fixed factor on a residual branch (no parameters)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value

    def extra_repr(self) -> str:
        return f"{self.value:g}"


class DeepViT(VisionTransformer):
    """DeepViT (Zhou et al., 2021; see the module docstring).  ``scale_adjustment = a`` is the official code's
    ``x + attn(LN(a x)) / a`` (then the same for the MLP) in every block: since ``LN(a x)`` is ``LN(x)`` with
    ``eps / a**2``, it is built exactly as a fixed branch factor ``1/a`` (:class:`BranchConstant` as ``ls1`` /
    ``ls2``) and the blocks' LayerNorm eps divided by ``a**2``.  Needs ``branch_scale="plain"``."""

    def __init__(self, scale_adjustment: float = 1.0, **kwargs: Any):
        if scale_adjustment <= 0:
            raise ValueError(f"scale_adjustment must be > 0, got {scale_adjustment}")
        kwargs.setdefault("architecture", "deepvit")
        super().__init__(**kwargs)
        self.scale_adjustment = scale_adjustment
        if scale_adjustment == 1.0:
            return
        for blk in self.blocks:
            if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
                raise ValueError("scale_adjustment != 1 needs branch_scale='plain' (it is a fixed branch factor); "
                                 f"got {kwargs.get('branch_scale') or kwargs.get('shortcut')!r}")
            blk.ls1, blk.ls2 = BranchConstant(1 / scale_adjustment), BranchConstant(1 / scale_adjustment)
            for norm in (blk.norm1, blk.norm2):
                if isinstance(norm, nn.LayerNorm):
                    norm.eps = norm.eps / scale_adjustment ** 2


def _register(cls, name: str, defaults: Dict[str, Any], doc: str, **cfg: Any) -> None:
    register_recipe(cls, name, defaults, f"{name}: {doc} ({defaults}).", **cfg)


# SimpleViT: the paper's ViT-S/16 and its ViT-Ti/B siblings at 224 px (big_vision's "S/16", "Ti/16", "B/16")
for _size in ("tiny", "small", "base"):
    _register(SimpleViT, f"simple_vit_{_size}_patch16_224", dict(_SIZES[_size], patch_size=16, img_size=224),
              f"SimpleViT-{_size[0].upper()}/16 (Beyer et al., 2022)")


def _last(k: int, spec: Any) -> Dict[int, Any]:
    """``block_modifiers`` giving ``spec`` to the last ``k`` blocks (negative indices: depth overrides keep it)."""
    return {-i: (spec,) for i in range(1, k + 1)}


# DeepViT-S / -L of the official code (deepvit_S / deepvit_L): 16 blocks of 396 (re-attention in the last 5,
# scaled by head_dim**-0.5) and 32 blocks of 420 (re-attention in the last 12), 12 heads, MLP ratio 3
_DEEPVIT = dict(patch_size=16, img_size=224, num_heads=12, mlp_ratio=3.0, embed="deepvit_conv", scale_adjustment=0.5)
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9)
_register(DeepViT, "deepvit_s", dict(_DEEPVIT, embed_dim=396, depth=16,
                                     block_modifiers=_last(5, ("reattention", {"reattn_scale": True}))),
          "DeepViT-S (Zhou et al., 2021)", **_HALF)
_register(DeepViT, "deepvit_l", dict(_DEEPVIT, embed_dim=420, depth=32, block_modifiers=_last(12, "reattention")),
          "DeepViT-L (Zhou et al., 2021)", **_HALF)

# Lee et al. (2021): the small-dataset ViT, plain, with SPT, with LSA and with both ("SL-ViT")
_SMALL_DATA = dict(embed_dim=192, depth=9, num_heads=12, mlp_ratio=2.0, qkv_bias=False, norm_eps=1e-5)
_CIFAR = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)
for _suffix, _parts in (("", {}), ("_spt", dict(embed="spt")), ("_lsa", dict(modifiers=("lsa",))),
                        ("_sl", dict(embed="spt", modifiers=("lsa",)))):
    _register(VisionTransformer, f"vit_small_data{_suffix}_patch4_32",
              dict(_SMALL_DATA, patch_size=4, img_size=32, num_classes=10, **_parts),
              f"ViT for small-size datasets{_suffix.replace('_', ' + ').upper()} at CIFAR size (Lee et al., 2021)",
              **_CIFAR)
_register(VisionTransformer, "vit_small_data_sl_patch8_64",
          dict(_SMALL_DATA, patch_size=8, img_size=64, num_classes=200, embed="spt", modifiers=("lsa",)),
          "SL-ViT at Tiny-ImageNet size (Lee et al., 2021)", crop_pct=1.0)

# LocalViT-T / -S (Li et al., 2021): DeiT-T / -S with the depthwise-conv feed-forward (h-swish + SE)
for _size in ("tiny", "small"):
    _register(VisionTransformer, f"localvit_{_size}", dict(_SIZES[_size], patch_size=16, img_size=224,
                                                            mlp="localvit_se"),
              f"LocalViT-{_size[0].upper()} (Li et al., 2021)")


def small_data_vit(spt: bool = True, lsa: bool = True, **overrides: Any) -> VisionTransformer:
    """The CIFAR-size ViT of Lee et al. with or without each of its two parts (for ablations)."""
    parts: Dict[str, Optional[Any]] = dict(embed="spt" if spt else "patch", modifiers=("lsa",) if lsa else ())
    return VisionTransformer(**{**_SMALL_DATA, "patch_size": 4, "img_size": 32, "num_classes": 10, **parts,
                                **overrides})
