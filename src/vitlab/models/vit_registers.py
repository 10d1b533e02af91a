"""timm's register-token ViTs beyond the three in :mod:`vitlab.models.vit` (timm's ``vit_*_reg*`` names).

"Vision Transformers Need Registers" (Darcet, Oquab, Mairal & Bojanowski, ICLR 2024, sec. 2.2): ``R``
learnable register tokens join the class token as prefix tokens and are dropped at the output.  Recipes, all
:class:`~vitlab.models.vit.VisionTransformer` with timm's sizes and state-dict keys:

* DINOv2 with registers (Oquab et al., TMLR 2024): ViT-L/14 and ViT-g/14 (SwiGLU MLP, channel mixer
  ``swiglu_packed``), 4 registers, LayerScale 1e-5, feature extractors without a classifier;
* TIPSv2 (timm's ``*_reg1_tipsv2``): DINOv2-style, 1 register, LayerScale initialised at 1.0, 448 px;
* timm's "searching for better baselines" (``sbb``) ViTs: no class token, 1 or 4 registers, average pooling of
  the patch tokens (``gap``) or attention pooling (``map``), in timm's sizes wee ... so150m2;
* the sbb ``*_rope_reg*`` ones (timm's ``Eva`` class, :class:`Eva` here): no position table, EVA-02's RoPE
  (Fang et al., 2023, sec. 2; part ``rope`` with ``rope_theta=10000, rope_order="yx", rope_ref_grid=(16, 16)``)
  and BEiT's q/v-only qkv bias (projection ``linear_qv_bias``); timm's keys through vitlab.interop.timm_eva.
* the sbb ``vit_dwee``/``vit_dlittle`` (differential attention, "Differential Transformer", Ye et al., ICLR 2025:
  core ``differential``), ``vit_pwee`` (ViT-22B's parallel block, timm's ``ParallelScalingBlock``: wiring
  ``parallel_scaling``) and ``vit_dpwee`` (both); the parallel ones' keys through vitlab.interop.timm_vit.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__ = ["SIZES", "Eva"]


class Eva(VisionTransformer):
    """A :class:`VisionTransformer` saved in the key layout of timm's ``Eva`` ("EVA-02: A Visual Representation
    for Neon Genesis", Fang et al., 2023): LayerScale as ``blocks.{i}.gamma_1`` / ``gamma_2`` (the converter in
    :mod:`vitlab.interop.timm_eva` dispatches on this class); the model itself is built from the usual parts.

    With the default ``init`` it starts as timm's ``Eva`` (BEiT's init, Bao et al., ICLR 2022, code): class and
    register tokens ~ N(0, 0.02), block ``l``'s ``attn.proj`` and ``mlp.fc2`` weights divided by
    ``sqrt(2 l)``, the head's weight ~ N(0, 0.02) times ``head_init_scale`` (0.001)."""

    head_init_scale = 0.001

    def _init_weights(self, init: str) -> None:
        super()._init_weights(init)
        if init != "trunc_normal":  # a chosen initialiser is applied as chosen
            return
        self.init_prefix_tokens(0.02)
        with torch.no_grad():
            for depth, block in enumerate(self.blocks, start=1):  # depth-scaled residual outputs
                for linear in (getattr(block.attn, "proj", None), getattr(block.mlp, "fc2", None)):
                    if isinstance(linear, nn.Linear):
                        linear.weight.div_(math.sqrt(2.0 * depth))
            if isinstance(self.head, nn.Linear):  # timm's trunc_normal_ bounds are +-2 absolute: ~ N(0, 0.02)
                nn.init.trunc_normal_(self.head.weight, std=0.02).mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)


# timm's model_args: width, depth, heads and the MLP width as a ratio of the width (fc1's width, both halves, for
# SwiGLU); extra keys are the size's fixed choices
SIZES: Dict[str, Dict[str, Any]] = {
    "wee": dict(embed_dim=256, depth=14, num_heads=4, mlp_ratio=5.0),
    "little": dict(embed_dim=320, depth=14, num_heads=5, mlp_ratio=5.6),
    "medium": dict(embed_dim=512, depth=12, num_heads=8),
    "mediumd": dict(embed_dim=512, depth=20, num_heads=8),
    "betwixt": dict(embed_dim=640, depth=12, num_heads=10),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "so150m": dict(embed_dim=896, depth=18, num_heads=14, mlp_ratio=2.572),
    "so150m2": dict(embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, qkv_bias=False),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152),
    "giant": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp="swiglu_packed"),
}
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # the sbb models' normalisation
_LS = dict(branch_scale="layerscale", shortcut_init=1e-5)  # timm's init_values=1e-5
_DINOV2 = dict(reg_tokens=4, no_embed_class=True, num_classes=0, **_LS)
_TIPS = dict(reg_tokens=1, no_embed_class=True, num_classes=0, branch_scale="layerscale", shortcut_init=1.0)
_GAP = dict(class_token=False, no_embed_class=True, global_pool="avg", **_LS)


def _register(size: str, patch: int, tag: str, img: int, model: Dict[str, Any], variant: str = "",
              cls: type = VisionTransformer, **cfg: Any) -> None:
    """``vit_{variant}{size}_patch{patch}_{tag}[_{img}]`` as timm names it (``variant``: timm's ``d``/``p``/``dp``
    prefix of the sbb sizes), a ``cls`` of ``SIZES[size]`` with ``model``'s choices; ``cfg`` is the data config."""
    name = f"vit_{variant}{size}_patch{patch}_{tag}" + (f"_{img}" if "gap" in tag or "map" in tag else "")
    defaults = dict(SIZES[size], patch_size=patch, img_size=img, **model)
    register_recipe(cls, name, defaults, f"{name}: ViT-{size}/{patch} with register tokens at "
                    f"{img}x{img} ({defaults}); timm's {name}.", **cfg)


for _size in ("large", "giant"):  # DINOv2 + registers (ImageNet normalisation, vitlab's default)
    _register(_size, 14, "reg4_dinov2", 518, _DINOV2, crop_pct=1.0)
for _size in ("base", "large", "so400m", "giant"):  # TIPSv2: inputs in [0, 1]
    _register(_size, 14, "reg1_tipsv2", 448, _TIPS, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
for _size, _tag, _img, _crop in (("wee", "reg1", 256, 0.95), ("little", "reg1", 256, 0.95),
                                 ("little", "reg4", 256, 0.95), ("medium", "reg1", 256, 0.95),
                                 ("medium", "reg4", 256, 0.95), ("mediumd", "reg4", 256, 0.95),
                                 ("mediumd", "reg4", 384, 1.0), ("betwixt", "reg1", 256, 0.95),
                                 ("betwixt", "reg4", 256, 0.95), ("betwixt", "reg4", 384, 1.0)):
    _register(_size, 16, f"{_tag}_gap", _img, dict(_GAP, reg_tokens=int(_tag[-1])), crop_pct=_crop, **_HALF)
# SoViT-150M shapes ("Getting ViT in Shape", Alabdulmohsin et al., NeurIPS 2023): the position table covers the
# registers too; so150m: no LayerScale, final norm before the pooling (fc_norm=False) or a MAP head
for _img, _crop in ((256, 0.95), (384, 1.0)):
    _register("so150m", 16, "reg4_gap", _img, dict(class_token=False, reg_tokens=4, global_pool="avg",
                                                  fc_norm=False), crop_pct=_crop, **_HALF)
_register("so150m", 16, "reg4_map", 256, dict(class_token=False, reg_tokens=4, global_pool="map"), crop_pct=0.9,
          **_HALF)
for _img in (256, 384, 448):
    _register("so150m2", 16, "reg1_gap", _img, dict(class_token=False, reg_tokens=1, global_pool="avg", **_LS),
              crop_pct=1.0, **_HALF, **({"crop_mode": "squash"} if _img == 448 else {}))


# sbb ViTs with differential attention (core "differential"; timm's attn_layer='diff') and with ViT-22B's parallel
# block (wiring "parallel_scaling"; timm's ParallelScalingBlock; the differential one fuses the two output
# projections, so the attention's has no bias and the MLP's fc2 holds the one bias)
_DIFF, _PAR = dict(core="differential"), dict(wiring="parallel_scaling", depth=16)
for _tag, _size, _model in (("d", "wee", _DIFF), ("d", "little", _DIFF), ("p", "wee", _PAR),
                            ("dp", "wee", dict(_DIFF, **_PAR, mixer_kwargs=dict(proj_bias=False)))):
    _register(_size, 16, "reg1_gap", 256, dict(_GAP, reg_tokens=1, **_model), variant=_tag, crop_pct=0.95, **_HALF)
# timm's sbb ViTs with RoPE (timm's Eva, qkv_fused=True): no position table, rope on a 16x16 reference grid (timm's
# ref_feat_shape, "224/14"), LayerScale 1e-5, average pooling; betwixt keeps timm's Eva default (CLIP) normalisation
_EVA_ROPE = dict(_GAP, pos_embed="none", mixer_kwargs=dict(projection="linear_qv_bias"),
                 attn_position=(("rope", dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=(16, 16))),))
for _size, _regs, _bias, _norm in (("medium", 1, True, _HALF), ("mediumd", 1, False, _HALF),
                                   ("betwixt", 4, True, dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)),
                                   ("base", 1, True, _HALF)):
    _register(_size, 16, f"rope_reg{_regs}_gap", 256, dict(_EVA_ROPE, reg_tokens=_regs, qkv_bias=_bias), cls=Eva,
              crop_pct=0.95, **_norm)
