"""EVA-02 image encoders and classifiers under timm's ``eva02_*`` names.

"EVA-02: A Visual Representation for Neon Genesis" (Fang, Sun, Wang, Huang, Wang & Cao, 2023, sec. 2 and
Table 1): a plain ViT (patch 14, class token, learned position table with a class row, pre-norm blocks without
LayerScale) whose parts are swapped for

* SwiGLU channel mixers ("GLU Variants Improve Transformer", Shazeer, 2020) of hidden width ``8/3 * dim`` per
  half: ``swiglu_packed`` (one ``fc1``) for Ti and S, ``swiglu_norm`` (``fc1_g`` / ``fc1_x`` and the sub-LN before
  ``fc2``, timm's ``scale_mlp``) for B and L;
* 2-D rotary position embedding on the patch tokens (the class token unrotated): part ``rope`` with base 10000,
  the rows' pairs first (``rope_order="yx"``) and coordinates in units of the 16 x 16 grid of pretraining
  (``rope_ref_grid``, timm's ``ref_feat_shape``; at 336 or 448 px the 24 x 24 or 32 x 32 grid is rescaled to it);
* BEiT's q/v-only qkv bias: projection ``linear_qv_bias`` (fused ``qkv``) for Ti and S, ``separate_qv_bias``
  (``q_proj`` / ``k_proj`` / ``v_proj``, timm's ``qkv_fused=False``) for B and L;
* average pooling of the patch tokens into ``fc_norm`` (no final ``norm``), CLIP normalisation.

The models are :class:`~vitlab.models.vit_registers.Eva` (timm ``Eva``'s init), so their state-dict keys are timm's
without a rename.  ``*_224`` are the MIM-pretrained encoders (no classifier, ``num_classes=0``, as timm), the
others the ImageNet-1k classifiers fine-tuned at 336 (Ti, S) or 448 px (B, L).  The EVA-CLIP towers
(``eva02_*_clip_*``: a LayerNorm inside the attention, token pooling) are not registered.

With a width override, the packed sizes' fc1 is ``int(dim * 16/3)`` wide where timm's is ``2 * int(dim * 8/3)``:
equal for the registered widths (and any multiple of 3, or e.g. 32, 48), one channel apart otherwise.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vitlab.models.base import register_recipe
from vitlab.models.vit_registers import Eva

__all__ = ["SIZES"]

_EVA_ROPE = (("rope", dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=(16, 16))),)
_RATIO = 4 * 2 / 3  # timm's mlp_ratio: SwiGLU's per-half hidden width over dim
_PACKED = dict(mlp="swiglu_packed", mlp_ratio=2 * _RATIO, mixer_kwargs=dict(projection="linear_qv_bias"))
_SUB_LN = dict(mlp="swiglu_norm", mlp_ratio=_RATIO, mixer_kwargs=dict(projection="separate_qv_bias"))
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, **_PACKED),
    "small": dict(embed_dim=384, depth=12, num_heads=6, **_PACKED),
    "base": dict(embed_dim=768, depth=12, num_heads=12, **_SUB_LN),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, **_SUB_LN),
}
_COMMON = dict(patch_size=14, global_pool="avg", attn_position=_EVA_ROPE)
_CLIP_NORM = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def _register(size: str, img: int, num_classes: int, **cfg: Any) -> None:
    """``eva02_{size}_patch14_{img}`` as timm names it; ``cfg`` is timm's data config for its default weights."""
    name = f"eva02_{size}_patch14_{img}"
    defaults = dict(SIZES[size], img_size=img, num_classes=num_classes, **_COMMON)
    what = "MIM-pretrained encoder" if not num_classes else "ImageNet-1k classifier"
    register_recipe(Eva, name, defaults, f"{name}: EVA-02-{size} {what} at {img}x{img} ({defaults}); timm's "
                    f"{name}.", **_CLIP_NORM, **cfg)


for _size in SIZES:
    _register(_size, 224, 0, crop_pct=0.9)
for _size in ("tiny", "small"):
    _register(_size, 336, 1000, crop_pct=1.0)
for _size in ("base", "large"):
    _register(_size, 448, 1000, crop_pct=1.0, crop_mode="squash")
