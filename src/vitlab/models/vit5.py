"""ViT-5 ("ViT-5: Vision Transformers for The Mid-2020s", Wang, Ren, Zhang, Neskovic, Bhattad, Xie & Yuille,
2026, sec. 3 and the official code ``models_vit5.py``), built from vitlab's parts on the plain
:class:`~vitlab.models.vit.VisionTransformer`: nothing here is new except the recipe.

The paper's seven component choices and the part each one is in vitlab:

* LayerScale initialised at 1e-4 on both branches: ``branch_scale="layerscale", shortcut_init=1e-4``;
* RMSNorm (eps 1e-6) for every norm: ``norm="rms"``;
* GELU MLP, ratio 4 (SwiGLU rejected next to LayerScale): ``mlp="mlp"``;
* absolute position table on the patches (learned, ~N(0, 0.02)) *and* 2-D RoPE (EVA form, base 10000, first half
  of the pairs on the rows, coordinates on the training grid): ``no_embed_class=True`` plus part ``rope`` with
  ``rope_theta=10000, rope_order="yx", rope_ref_grid=img_size // patch_size``;
* 4 register tokens with their own high-frequency 2-D RoPE (2 x 2 grid, base 100); the class token is not rotated:
  ``reg_tokens=4`` and the rope part's ``rope_registers=4, rope_register_theta=100``;
* QK-norm with RMSNorm over each head (eps 1e-6): ``mixer_kwargs=dict(qk_norm="rms")``;
* no qkv bias (the output projection keeps its bias): ``qkv_bias=False``.

The class token is read by the head after the final RMSNorm.  The official code appends the registers after the
patches; vitlab keeps timm's order ``[class, registers, patches]``: attention does not depend on the order, and
every token keeps its own rotation, so the outputs are the same.  Official checkpoints load as released
(``create_model("vit5_base", checkpoint_path=...)``, ``vitlab train --pretrained``): :func:`vit5_from_official`
renames their LayerScale keys (:mod:`vitlab.interop.official`).  Sizes are the official ``vit5_small`` (22.0 M
parameters), ``vit5_base`` (86.5 M), ``vit5_large`` (304 M) and ``vit5_xlarge`` (ViT-5-XL, 1152 wide, 28 deep).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple, Union

import torch

from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT5", "vit5_kwargs", "vit5_from_official"]

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def vit5_kwargs(img_size: Size = 224, patch_size: Size = 16, reg_tokens: int = 4,
                mixer_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The :class:`VisionTransformer` arguments that make a ViT-5 at ``img_size`` (the RoPE reference grid is the
    training grid, as the official ``rope_size = img_size // patch_size``)."""
    grid = tuple(i // p for i, p in zip(_pair(img_size), _pair(patch_size)))
    rope = dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=grid, rope_registers=reg_tokens,
                rope_register_theta=100.0)
    return dict(img_size=img_size, patch_size=patch_size, reg_tokens=reg_tokens, qkv_bias=False, norm="rms",
                norm_eps=1e-6, branch_scale="layerscale", shortcut_init=1e-4, no_embed_class=True,
                attn_position=(("rope", rope),), mixer_kwargs=dict(dict(qk_norm="rms"), **(mixer_kwargs or {})))


class ViT5(VisionTransformer):
    """ViT-5 (see the module docstring): a :class:`VisionTransformer` with ViT-5's parts; any other argument of
    :class:`VisionTransformer` overrides the recipe.  Initialised as the official code: class token, registers and
    position table ~ N(0, 0.02) cut at +-2 (timm's ``trunc_normal_``), Linear weights likewise, biases 0."""

    def __init__(self, img_size: Size = 224, patch_size: Size = 16, reg_tokens: int = 4,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, architecture: str = "vit5", **kwargs: Any):
        recipe = vit5_kwargs(img_size, patch_size, reg_tokens, mixer_kwargs)
        super().__init__(**{**recipe, **kwargs}, architecture=architecture)

    def _init_weights(self, init: str) -> None:
        super()._init_weights(init)
        if init != "trunc_normal":  # a chosen initialiser is applied as chosen
            return
        self.init_prefix_tokens(0.02)


def vit5_from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official ViT-5 state dict (LayerScale as ``blocks.{i}.gamma_1`` / ``gamma_2``) with vitlab's keys
    (``blocks.{i}.ls1.gamma`` / ``ls2.gamma``); every other key is already timm's and vitlab's."""
    return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in state_dict.items()}


# the official sizes (models_vit5.py): width, depth, heads; MLP ratio 4, patch 16, 224 px
_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "xlarge": (1152, 28, 16)}
for _size, (_dim, _depth, _heads) in _SIZES.items():
    register_recipe(ViT5, f"vit5_{_size}", dict(embed_dim=_dim, depth=_depth, num_heads=_heads),
                    f"vit5_{_size}: ViT-5-{_size[0].upper() if _size != 'xlarge' else 'XL'} (Wang et al., 2026), "
                    f"width {_dim}, depth {_depth}, {_heads} heads, patch 16, 224 px, 4 registers.")
