"""ScalableViT, built from vitlab parts.

"ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer" (Yang, Zhou, Yu, Zhang,
Li, Wang & Zheng, ECCV 2022).  Four stages, each opened by an overlapping conv patch embedding (7x7 stride 4,
then 3x3 stride 2, + LayerNorm), whose pre-norm blocks alternate **interactive window self-attention**
(IWSA, sec. 3.2: ``window`` grouping + the local interactive module, position part ``lim``) and **scalable
self-attention** (SSA, sec. 3.1: grouping ``scalable_reduction`` + projection ``scalable``, spatial reduction
``sr_ratio`` and channel scaling ``c_ratio`` per stage); a PEG (CPVT's position generator) follows the first
block of every stage (the official code).  A final LayerNorm, the mean of the tokens and the official head: a
Linear to 4096 -> LayerNorm -> GELU -> Linear (``head_hidden=0``: one Linear).

Parts, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: refused by SSA's
reduced keys) / ``mixer_kwargs`` (in IWSA and SSA; a linear-cost core such as ``focused_linear`` attends over the whole
map, without reduction, FLatten's rule; IWSA keeps its LIM), ``norm``, ``branch_scale`` (alias ``shortcut``) /
``shortcut_init``, ``featscale``, ``wiring``, ``init``.

State-dict keys: ``patch_embed.{proj,norm}``, ``stages.{i}.downsample.{proj,norm}``, ``stages.{i}.pos_block.
proj.0``, ``stages.{i}.blocks.{j}.{norm1, attn.{qkv, lim_func | q, k, v, kv, reduction, norm_act}, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head.{0,1,3}``; timm has no ScalableViT, and
:func:`scalablevit_from_official` renames the official code's ``patch_embeds.{i}``, ``pos_block.{i}`` and
``stages.{i}.{j}``.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from vitlab.layers import MixerSpec, create_norm, create_pos_code, init_weights
from vitlab.models.backbone import Backbone, ConvPatchEmbed
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.crossformer import fit_input_size
from vitlab.models.swin import _per_stage, build_stages, check_stage_sizes, stage_attn_types

__all__ = ["ScalableViT", "scalablevit_attention", "scalablevit_from_official"]

WHOLE_MAP = 1 << 30  # a window no map reaches: the window grouping shrinks it to the map


def scalablevit_attention(spec: MixerSpec, window: Optional[int], sr_ratio: int, c_ratio: float, norm: str,
                          **attention: Any) -> Dict[str, Any]:
    """What a ScalableViT block asks of its attention (Yang et al., 2022): IWSA (``window`` > 1, or None for one
    window over the map) or SSA (``window == 1``); see the module docstring."""
    if not spec.attention:
        return {}
    if window != 1:
        lim = (("lim", {}),)
        if spec.linear_cost:
            return dict(attention, position=lim)
        return dict(attention, grouping=("window", dict(window_size=window or WHOLE_MAP)), position=lim)
    if spec.linear_cost:
        return dict(attention)
    return dict(attention, projection=("scalable", dict(c_ratio=c_ratio)),
                grouping=("scalable_reduction", dict(sr_ratio=sr_ratio, c_ratio=c_ratio, norm=norm)))


class ScalablePatchEmbed(ConvPatchEmbed):
    """A ``k x k`` stride-``s`` conv with ``padding`` (the official ``ConvPatchEmbed``: 7/4/3, then 3/2/1) + norm,
    then the position dropout the official code applies after it (``pos_drops``)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int, padding: int, norm: str,
                 norm_eps: float, drop: float = 0.0):
        super().__init__(in_chans, out_chans, kernel, stride, padding, norm, norm_eps)
        self.pos_drop = nn.Dropout(drop)

    def on_map(self, x: torch.Tensor):
        tokens, hw = super().on_map(x)
        return self.pos_drop(tokens), hw


class ScalableViT(Backbone):
    """ScalableViT (Yang et al., ECCV 2022) whose parts are arguments; see the module docstring.

    Sizes as the official code: ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratio``, ``sr_ratios``, ``wss``
    (IWSA window per stage; 1: every block SSA; None: one window over the map), ``c_ratios``, ``head_hidden``.
    ``dynamic_img_size``: any input size (the windows are re-fitted when the size changes).
    """

    stage_attr = "stages"
    _no_weight_decay_keys = Backbone._no_weight_decay_keys + ("pos_block",)  # the official no_weight_decay

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 20, 2),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 4.0,
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), wss: Sequence[Optional[int]] = (7, 7, 7, 7),
                 c_ratios: Union[float, Sequence[float]] = (1.25, 1.25, 1.25, 1.0), head_hidden: int = 4096,
                 qkv_bias: bool = True, mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, shortcut: str = "plain",
                 branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dynamic_img_size: bool = False, architecture: str = "scalablevit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths, heads = tuple(depths), tuple(num_heads)
        n = len(depths)
        check_stage_sizes(depths, heads, 1, drop_path_rate)
        dims = _per_stage(tuple(embed_dims), n, "embed_dims")
        srs, windows, cs = (_per_stage(v, n, k) for v, k in ((sr_ratios, "sr_ratios"), (wss, "wss"),
                                                              (c_ratios, "c_ratios")))
        img = int(img_size if isinstance(img_size, int) else img_size[0])
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.dynamic_img_size, self.depths = dynamic_img_size, depths
        self.embed_dim, self.num_features = dims[0], dims[-1]
        self.patch_embed = ScalablePatchEmbed(in_chans, dims[0], 7, 4, 3, norm, norm_eps, drop_rate)
        hw = self.grid_size = self.patch_embed.out_size((img, img))
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)

        def down(i, hw):
            merge = ScalablePatchEmbed(dims[i - 1], dims[i], 3, 2, 1, norm, norm_eps, drop_rate)
            return merge, merge.out_size(hw)

        def attend(st_spec, i, j, hw):
            return scalablevit_attention(st_spec, 1 if j % 2 else windows[i], srs[i], cs[i], norm, **attention)

        stages = build_stages(spec, stage_attn_types(spec, None, n, "window/SSA"), dims, depths, heads, hw, 4, down,
                              attend, mlp_ratio, drop_rate, drop_path_rate, norm=norm, norm_eps=norm_eps,
                              wiring=wiring, branch_scale=branch_scale or shortcut, branch_scale_init=shortcut_init,
                              featscale=featscale)
        for stage in stages:  # CPVT's PEG after each stage's first block (the official PosCNN)
            stage.pos_block, stage.pos_block_after = create_pos_code("peg", stage.dim), 0
        self.stages = nn.ModuleList(stages)
        self.norm = create_norm(norm, self.num_features, eps=norm_eps)
        self.head = self._make_head(num_classes, head_hidden, norm, norm_eps)
        self.init_name = init
        with torch.no_grad():
            init_weights(self, init, conv_fan_out=True)  # the official code's fan-out conv init
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.875)

    def _make_head(self, num_classes: int, hidden: int, norm: str, eps: float) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if not hidden:
            return nn.Linear(self.num_features, num_classes)
        return nn.Sequential(nn.Linear(self.num_features, hidden), create_norm(norm, hidden, eps=eps), nn.GELU(),
                             nn.Linear(hidden, num_classes))

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        fit_input_size(self, x)


def scalablevit_from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a state dict of the official ScalableViT code (Yangr116/ScalableViT) to vitlab's keys:
    ``patch_embeds.0`` -> ``patch_embed``, ``patch_embeds.{i}`` -> ``stages.{i}.downsample``, ``pos_block.{i}``
    -> ``stages.{i}.pos_block``, ``stages.{i}.{j}`` -> ``stages.{i}.blocks.{j}``; ``{"model": sd}`` is unwrapped."""
    state_dict = state_dict.get("model", state_dict)
    rules = [(r"^patch_embeds\.0\.", "patch_embed."), (r"^patch_embeds\.(\d+)\.", r"stages.\1.downsample."),
             (r"^pos_block\.(\d+)\.", r"stages.\1.pos_block."), (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.")]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k, hit = re.subn(pattern, repl, k)
            if hit:
                break
        out[k] = v
    return out


# -- registered recipes: the official code's sizes; drop path as its README's training commands ----------------
_SIZES = {
    "small": dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 20, 2),
                  c_ratios=(1.25, 1.25, 1.25, 1.0), drop_path_rate=0.2),
    "base": dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 14, 6),
                 c_ratios=(2.0, 1.25, 1.25, 1.0), drop_path_rate=0.5),
    "large": dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 6, 12, 4),
                  c_ratios=(0.25, 0.5, 1.0, 1.0), drop_path_rate=0.5),
}
for _size, _cfg in _SIZES.items():
    register_recipe(ScalableViT, f"scalablevit_{_size}", dict(_cfg, sr_ratios=(8, 4, 2, 1), wss=(7, 7, 7, 7)),
                    f"ScalableViT-{_size[0].upper()} (Yang et al., ECCV 2022), official code's sizes.")
