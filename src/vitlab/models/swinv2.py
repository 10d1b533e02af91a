"""Swin Transformer V2, built from vitlab parts.

"Swin Transformer V2: Scaling Up Capacity and Resolution" (Liu et al., CVPR 2022).  The backbone is Swin's
(:mod:`vitlab.models.swin`: shifted windows, patch merging, its stage builder) with the paper's three changes,
each a vitlab part that any family can take:

* **res-post-norm** (sec. 3.2): the Block's ``wiring="res_post"``, ``x + DropPath(norm1(attn(x)))`` then
  ``x + DropPath(norm2(mlp(x)))``; the norms start at zero (weight and bias, the official code and timm), so every
  block starts as the identity;
* **scaled cosine attention** (sec. 3.2, eq. 2): core ``cosine`` with ``learn_logit_scale=True``, a learnable
  temperature per head, ``exp(min(logit_scale, log 100))``, starting at 10;
* **log-spaced continuous position bias** (sec. 3.3): position part ``cpb`` (:mod:`vitlab.layers.cpb`), with the
  pre-training window of fine-tuned models (``pretrained_window_sizes``, one per stage);

plus q and v biases only (projection ``linear_qv_bias``) and patch merging that projects before it normalises
(:class:`~vitlab.models.swin.PatchMerging` with ``norm_after=True``).  A user's ``mixer`` / ``core`` replaces the
cosine core (the logit scale is the cosine core's option, so another core has none); a linear-cost core attends
over the whole map without windows or position bias (``attn_type``, as Swin); a non-attention mixer takes none of
the attention parts.

State-dict keys equal timm's ``swinv2_*`` models (``layers.{i}.blocks.{j}.attn.{logit_scale, cpb_mlp.{0,2},
qkv.weight, q_bias, v_bias, proj}``, ``...norm1/norm2``, ``layers.{i}.downsample.{reduction, norm}``, ``norm``),
except the classifier (``head`` here, ``head.fc`` in timm; :mod:`vitlab.interop.timm_swinv2` maps it).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from vitlab.layers import MixerSpec
from vitlab.layers.cores import CosineCore
from vitlab.models.backbone import Backbone
from vitlab.models.base import crop_pct_by_size, register_recipe
from vitlab.models.swin import SwinTransformer, _per_stage, stage_attn_types

__all__ = ["SwinTransformerV2", "swinv2_attention"]


def swinv2_attention(spec: MixerSpec, window_size: int, shift: bool, pretrained_window_size: Union[int, Tuple],
                     cpb: bool = True, **attention: Any) -> Dict[str, Any]:
    """What Swin V2 asks of a stage's attention: (shifted) windows with the continuous position bias and the q/v
    bias projection; for a linear-cost core one global window with the projection only; nothing for a
    non-attention mixer."""
    if not spec.attention:
        return {}
    parts = dict(attention, projection="linear_qv_bias")
    if spec.linear_cost:
        return parts
    return dict(parts, grouping=("window", dict(window_size=window_size, shift=shift)),
                position=(("cpb", dict(pretrained_window_size=pretrained_window_size)),) if cpb else ())


def _with_logit_scale(spec: MixerSpec, attn_type: str) -> MixerSpec:
    """The user's mixer; a cosine core in window stages gets Swin V2's per-head learnable logit scale unless
    ``mixer_kwargs`` says otherwise."""
    if "S" in attn_type and spec.core_part is not None and issubclass(spec.core_part, CosineCore):
        spec.kwargs.setdefault("learn_logit_scale", True)
    return spec


class SwinTransformerV2(SwinTransformer):
    """Swin Transformer V2 whose parts are arguments (Liu et al., CVPR 2022); see the module docstring.  A
    :class:`~vitlab.models.swin.SwinTransformer` with V2's defaults and its attention parts (:meth:`window_attention`).

    Sizes as Swin's (``embed_dim``, ``depths``, ``num_heads``, ``window_size`` (int or one per stage),
    ``mlp_ratio``) plus ``pretrained_window_sizes`` (0: none; int or one per stage: the windows a fine-tuned
    model was pre-trained with, for the position bias).  Parts: ``mixer`` (default ``cosine``), ``core``,
    ``modifiers``, ``attn_position`` (added after ``cpb``), ``mixer_kwargs``, ``attn_type`` (``L``/``S`` per
    stage, as Swin), ``norm``, ``norm_eps``, ``wiring`` (default ``res_post``), ``branch_scale`` / ``shortcut``
    with ``shortcut_init``, ``featscale``, ``conv_units``, ``init``, ``shift``, ``cpb`` (the position bias on or
    off), ``qkv_bias`` (q and v biases).  Dropouts: ``drop_rate`` (head), ``proj_drop_rate`` (attention output
    and MLP), ``attn_drop_rate``, ``drop_path_rate`` (timm's names and meanings).
    """

    _no_weight_decay_keys = Backbone._no_weight_decay_keys + ("cpb_mlp", "logit_scale")  # timm's

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Union[int, Sequence[int]] = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pretrained_window_sizes: Union[int, Sequence[int]] = 0, mixer: str = "cosine",
                 attn_type: Optional[str] = None, norm: str = "layernorm", norm_eps: float = 1e-5,
                 wiring: str = "res_post", shortcut: str = "plain", branch_scale: Optional[str] = None,
                 shortcut_init: Optional[float] = None, featscale: bool = False, conv_units: bool = False,
                 init: str = "trunc_normal", shift: bool = True, cpb: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 architecture: str = "swinv2", default_cfg: Optional[Dict[str, Any]] = None):
        n_stages = len(tuple(depths))
        # read by window_attention while the stages are built (plain attributes may precede Module.__init__)
        self.pretrained_window_sizes = _per_stage(pretrained_window_sizes, n_stages, "pretrained_window_sizes")
        self.cpb = cpb
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        spec = _with_logit_scale(spec, stage_attn_types(spec, attn_type, n_stages, "window"))
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size,
                         mlp_ratio, qkv_bias, mixer=mixer, attn_type=attn_type, norm=norm, norm_eps=norm_eps,
                         shortcut=shortcut, shortcut_init=shortcut_init, featscale=featscale, init=init, shift=shift,
                         wiring=wiring, conv_units=conv_units, rel_pos_bias=False, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, mixer_kwargs=spec.kwargs,
                         core=core, modifiers=modifiers, attn_position=attn_position, branch_scale=branch_scale,
                         proj_drop_rate=proj_drop_rate, merge_norm_after=True, architecture=architecture,
                         default_cfg=default_cfg)
        if wiring == "res_post":
            self._zero_res_post_norms()

    def window_attention(self, spec: MixerSpec, stage: int, dim: int, hw: Tuple[int, int], num_heads: int,
                         window: int, shift: bool, rel_pos_bias: bool, **attention: Any) -> Dict[str, Any]:
        """Swin V2's attention parts (:func:`swinv2_attention`) with stage ``stage``'s pre-training window."""
        return swinv2_attention(spec, window, shift, self.pretrained_window_sizes[stage], self.cpb, **attention)

    @torch.no_grad()
    def _zero_res_post_norms(self) -> None:
        """Every block's ``norm1`` / ``norm2`` weight and bias to 0 (official ``_init_respostnorm``, timm's too):
        each block starts as the identity."""
        for stage in self.layers:
            for blk in stage.blocks:
                for p in (*blk.norm1.parameters(), *blk.norm2.parameters()):
                    p.zero_()


# -- registered recipes (timm's swinv2_* names, sizes and default configs) -----------------------
_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
_FINE_TUNED = dict(pretrained_window_sizes=(12, 12, 12, 6))  # ImageNet-22K at 192 / window 12 (stage 4: 6x6 map)


def _register(name: str, size: str, img_size: int, window_size: int, num_classes: int = 1000,
              **extra: Any) -> None:
    defaults = dict(_SIZES[size], img_size=img_size, window_size=window_size, num_classes=num_classes, **extra)

    def adjust(kw: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
        if "pretrained_window_sizes" in defaults and "pretrained_window_sizes" not in overrides:
            kw["pretrained_window_sizes"] = defaults["pretrained_window_sizes"][:len(kw["depths"])]  # fewer stages
        return kw

    register_recipe(SwinTransformerV2, name, defaults, f"{name}: Swin V2-{size[0].upper()} (Liu et al., CVPR 2022) "
                    f"({defaults}).", adjust, crop_pct=crop_pct_by_size)


for _size in ("tiny", "small", "base"):
    for _window in (8, 16):
        _register(f"swinv2_{_size}_window{_window}_256", _size, 256, _window)
for _size in ("base", "large"):
    _register(f"swinv2_{_size}_window12_192", _size, 192, 12, num_classes=21841)  # the ImageNet-22K models
    _register(f"swinv2_{_size}_window12to16_192to256", _size, 256, 16, **_FINE_TUNED)
    _register(f"swinv2_{_size}_window12to24_192to384", _size, 384, 24, **_FINE_TUNED)
