"""BEiT and BEiT v2 as recipes over vitlab's ViT (timm's ``beit_*`` / ``beitv2_*`` names, sizes and keys).

"BEiT: BERT Pre-Training of Image Transformers" (Bao, Dong, Piao & Wei, ICLR 2022) and "BEiT v2: Masked Image
Modeling with Vector-Quantized Visual Tokenizers" (Peng, Dong, Bao, Ye & Wei, 2022).  The fine-tuned backbone of
both is a ViT (sec. 2.2 of BEiT) with

* no absolute position table: a relative position bias in every block over global attention with the class token
  (position part ``beit_relative``, :mod:`vitlab.layers.beit_position`; sec. 2.2 and 3.1, "relative position
  bias"),
* q and v biases only (projection ``linear_qv_bias``),
* LayerScale (Touvron et al., ICCV 2021; BEiT sec. 3.1: 0.1 for the base models, 1e-5 for the large and v2 ones),
  saved as timm's ``gamma_1`` / ``gamma_2`` (the :class:`~vitlab.models.vit_registers.Eva` key layout, whose init is
  BEiT's: class token ~ N(0, 0.02), block ``l``'s output projections divided by ``sqrt(2 l)``, head times 0.001),
* average pooling of the patch tokens and ``fc_norm`` (BEiT sec. 3.1, "average the representations").

The family adds the projection and the relative table to whatever token mixer a user picks; a core that never
forms the token-token logits (linear attention, XCiT's channel attention) gets no table (FLatten's rule, as
Swin's), and a non-attention mixer none of the attention parts.  State-dict keys are timm's ``Beit`` through
:mod:`vitlab.interop.timm_eva` (the class is an ``Eva``).  timm's optional shared table
(``use_shared_rel_pos_bias``, used by no registered timm model) is not provided.
"""
from __future__ import annotations

from typing import Any, Dict, List

from vitlab.constants import IMAGENET_MEAN, IMAGENET_STD
from vitlab.layers import MixerSpec
from vitlab.layers.beit_position import resize_beit_table
from vitlab.models.base import register_recipe
from vitlab.models.vit_registers import Eva

__all__ = ["Beit", "beit_attention"]


def beit_attention(spec: MixerSpec) -> Dict[str, Any]:
    """What BEiT asks of a block's token mixer ``spec``: the q/v-bias projection (unless the user names one in
    ``mixer_kwargs``) and the relative table ``beit_relative``; none for a linear-cost core or a non-attention
    mixer (see the module docstring)."""
    if not spec.attention:
        return {}
    parts: Dict[str, Any] = {} if "projection" in spec.kwargs else {"projection": "linear_qv_bias"}
    if not spec.linear_cost:
        parts["position"] = ("beit_relative",)
    return parts


class Beit(Eva):
    """BEiT / BEiT v2 (see the module docstring): an :class:`~vitlab.models.vit_registers.Eva` (timm's keys and
    BEiT's init) whose blocks' attention gets :func:`beit_attention`'s parts before the user's ``attn_position``.
    Takes every :class:`~vitlab.models.vit.VisionTransformer` argument."""

    def _build_blocks(self, specs: List[MixerSpec], layouts, heads, mlp, hidden, num_parallel,
                      per_block: List[Dict[str, Any]], attn_kw, block_kw, drop_rate, drop_path_rate):
        per_block = [{**beit_attention(spec), **extra} for spec, extra in zip(specs, per_block)]
        return super()._build_blocks(specs, layouts, heads, mlp, hidden, num_parallel, per_block, attn_kw, block_kw,
                                     drop_rate, drop_path_rate)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As every vitlab model's, and a checkpoint's BEiT tables of another grid (224 -> 384 fine-tuning) resized
        to this model's first (:func:`~vitlab.layers.beit_position.resize_beit_table`, timm's
        ``checkpoint_filter_fn``)."""
        own = self.state_dict()
        fitted = dict(state_dict)
        for key, val in state_dict.items():
            if key.endswith("relative_position_bias_table") and key in own and own[key].shape != val.shape:
                owner = self.get_submodule(key.rsplit(".", 1)[0])
                if "beit_relative" in owner.part_names["position"]:  # other tables: the usual resize
                    fitted[key] = resize_beit_table(val, owner.rel_pos_window)
        return super().load_state_dict(fitted, strict=strict, assign=assign)


_SIZES = {"base": dict(embed_dim=768, depth=12, num_heads=12), "large": dict(embed_dim=1024, depth=24, num_heads=16)}
_BEIT = dict(patch_size=16, pos_embed="none", global_pool="avg", branch_scale="layerscale")
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # BEiT v1's normalisation (timm's cfg)


def _register(version: str, size: str, img: int, init_values: float, crop_pct: float, **cfg: Any) -> None:
    name = f"{version}_{size}_patch16_{img}"
    defaults = dict(_SIZES[size], img_size=img, shortcut_init=init_values, **_BEIT)
    paper = "BEiT v2 (Peng et al., 2022)" if version == "beitv2" else "BEiT (Bao et al., ICLR 2022)"
    register_recipe(Beit, name, defaults, f"{name}: {paper}, ViT-{size[0].upper()}/16 at {img}x{img} with a "
                    f"relative position bias per block, LayerScale {init_values} ({defaults}); timm's {name}.",
                    crop_pct=crop_pct, fixed_input_size=True, **cfg)


_register("beit", "base", 224, 0.1, 0.9, **_HALF)
_register("beit", "base", 384, 0.1, 1.0, **_HALF)
for _img, _crop in ((224, 0.9), (384, 1.0), (512, 1.0)):
    _register("beit", "large", _img, 1e-5, _crop, **_HALF)
_register("beitv2", "base", 224, 1e-5, 0.9, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_register("beitv2", "large", 224, 1e-5, 0.95, mean=IMAGENET_MEAN, std=IMAGENET_STD)
