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
from torch import nn

from vitlab.layers import MixerSpec, PatchEmbed, create_norm, init_weights
from vitlab.layers.cores import CosineCore
from vitlab.models.backbone import Backbone
from vitlab.models.base import make_default_cfg
from vitlab.models.factory import register_model
from vitlab.models.swin import PatchMerging, _per_stage, build_stages, check_stage_sizes, stage_attn_types

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


class SwinTransformerV2(Backbone):
    """Swin Transformer V2 whose parts are arguments (Liu et al., CVPR 2022); see the module docstring.

    Sizes as Swin's (``embed_dim``, ``depths``, ``num_heads``, ``window_size`` (int or one per stage),
    ``mlp_ratio``) plus ``pretrained_window_sizes`` (0: none; int or one per stage: the windows a fine-tuned
    model was pre-trained with, for the position bias).  Parts: ``mixer`` (default ``cosine``), ``core``,
    ``modifiers``, ``attn_position`` (added after ``cpb``), ``mixer_kwargs``, ``attn_type`` (``L``/``S`` per
    stage, as Swin), ``norm``, ``norm_eps``, ``wiring`` (default ``res_post``), ``branch_scale`` / ``shortcut``
    with ``shortcut_init``, ``featscale``, ``conv_units``, ``init``, ``shift``, ``cpb`` (the position bias on or
    off), ``qkv_bias`` (q and v biases).  Dropouts: ``drop_rate`` (head), ``proj_drop_rate`` (attention output
    and MLP), ``attn_drop_rate``, ``drop_path_rate`` (timm's names and meanings).
    """

    stage_attr = "layers"
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
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        n_stages = len(depths)
        check_stage_sizes(depths, num_heads, embed_dim, drop_path_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        self.attn_type = attn_type = stage_attn_types(spec, attn_type, n_stages, "window")
        spec = _with_logit_scale(spec, attn_type)
        windows = _per_stage(window_size, n_stages, "window_size")
        pretrained = _per_stage(pretrained_window_sizes, n_stages, "pretrained_window_sizes")
        self.num_classes, self.in_chans, self.depths, self.embed_dim = num_classes, in_chans, depths, embed_dim
        dims = [int(embed_dim * 2 ** i) for i in range(n_stages)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      norm_layer=create_norm(norm, embed_dim, eps=norm_eps))
        self.grid_size = self.patch_embed.grid_size
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)

        def down(i, hw):
            merge = PatchMerging(dims[i - 1], dims[i], norm=norm, norm_eps=norm_eps, norm_after=True)
            return merge, ((hw[0] + 1) // 2, (hw[1] + 1) // 2)

        def attend(st_spec, i, j, hw):
            return swinv2_attention(st_spec, windows[i], shift and j % 2 == 1, pretrained[i], cpb, **attention)

        self.layers = nn.ModuleList(build_stages(
            spec, attn_type, dims, depths, num_heads, self.grid_size, patch_size, down, attend, mlp_ratio,
            proj_drop_rate, drop_path_rate, norm=norm, norm_eps=norm_eps, wiring=wiring,
            branch_scale=branch_scale or shortcut, branch_scale_init=shortcut_init, featscale=featscale,
            conv_units=conv_units))
        self.norm = create_norm(norm, self.num_features, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        if wiring == "res_post":
            self._zero_res_post_norms()
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.patch_embed.img_size[0], num_classes,
                                                           in_chans, crop_pct=0.9)

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

    def factory(**overrides: Any) -> SwinTransformerV2:
        kw = {**defaults, **overrides}
        if "pretrained_window_sizes" in defaults and "pretrained_window_sizes" not in overrides:
            kw["pretrained_window_sizes"] = defaults["pretrained_window_sizes"][:len(kw["depths"])]  # fewer stages
        default_cfg = make_default_cfg(name, kw["img_size"], kw["num_classes"], kw.get("in_chans", 3),
                                       crop_pct=1.0 if kw["img_size"] >= 384 else 0.9)
        return SwinTransformerV2(architecture=name, default_cfg=default_cfg, **kw)

    factory.model_cls = SwinTransformerV2
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name}: Swin V2-{size[0].upper()} (Liu et al., CVPR 2022) ({defaults})."
    register_model(factory)


for _size in ("tiny", "small", "base"):
    for _window in (8, 16):
        _register(f"swinv2_{_size}_window{_window}_256", _size, 256, _window)
for _size in ("base", "large"):
    _register(f"swinv2_{_size}_window12_192", _size, 192, 12, num_classes=21841)  # the ImageNet-22K models
    _register(f"swinv2_{_size}_window12to16_192to256", _size, 256, 16, **_FINE_TUNED)
    _register(f"swinv2_{_size}_window12to24_192to384", _size, 384, 24, **_FINE_TUNED)
