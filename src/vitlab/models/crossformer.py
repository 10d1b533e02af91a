"""CrossFormer, built from vitlab parts.

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang, Yao, Chen, Lin, Cai,
He & Liu, ICLR 2022).  Four stages, each opened by a **cross-scale embedding layer** (CEL, sec. 3.1: convs of
kernels 4/8/16/32, stride 4, in the stem; 2/4, stride 2, between stages; channels concatenated:
:class:`~vitlab.layers.cross_embed.CrossScaleEmbed`), then pre-norm blocks that alternate **short-distance
attention** (SDA, sec. 3.2: ``G x G`` windows, the ``window`` grouping) and **long-distance attention** (LDA:
groups of ``G x G`` tokens sampled every ``S / G`` tokens, the ``dilated`` grouping), both with the **dynamic
position bias** (DPB, sec. 3.3: the ``dynamic`` position part).  A map not larger than ``G`` is one group
(LDA then equals SDA, as the official code switches).  Final LayerNorm, mean of the tokens, linear head.

Parts, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: coordinates inside
each SDA window and LDA group) / ``mixer_kwargs`` (in SDA and LDA; a linear-cost core such as ``focused_linear`` attends
over the whole map without groups or DPB, FLatten's rule), ``norm``, ``branch_scale`` (alias ``shortcut``) /
``shortcut_init``, ``featscale``, ``wiring``, ``init``.

State-dict keys follow the official code (timm has no CrossFormer): ``patch_embed.{projs.k, norm}``,
``layers.{i}.downsample.{norm, projs.k}`` (the official ``layers.{i-1}.downsample.{norm, reductions.k}``:
vitlab's stages open with their downsampler), ``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.pos.*,
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``; :func:`crossformer_from_official` renames.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vitlab.layers import MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.layers.cross_embed import CrossScaleEmbed
from vitlab.models.backbone import Backbone
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.swin import _per_stage, build_stages, check_stage_sizes, stage_attn_types

__all__ = ["CrossFormer", "crossformer_attention", "crossformer_from_official", "fit_input_size",
           "fit_window_groupings"]


def crossformer_attention(spec: MixerSpec, group_size: int, long_distance: bool, dpb_residual: bool = False,
                          **attention: Any) -> Dict[str, Any]:
    """What a CrossFormer block asks of its attention (Wang et al., 2022, sec. 3.2-3.3): SDA (``window``) or
    LDA (``dilated``) groups of ``group_size`` a side with the dynamic position bias; the whole map for a
    linear-cost core; nothing for a non-attention mixer."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    grouping = ("dilated", dict(group_size=group_size)) if long_distance else ("window", dict(window_size=group_size))
    return dict(attention, grouping=grouping, position=(("dynamic", dict(dpb_residual=dpb_residual)),))


def fit_input_size(model: Backbone, x: torch.Tensor) -> None:
    """With ``dynamic_img_size`` re-fit the window groupings to ``x``'s size; otherwise ``x`` must be the model's
    ``img_size`` (one clear error)."""
    hw = tuple(x.shape[-2:])
    if model.dynamic_img_size:
        fit_window_groupings(model, hw)
    elif hw != (model.img_size, model.img_size):
        raise ValueError(f"input image size {hw[0]}x{hw[1]} does not match the model's img_size {model.img_size}; "
                         f"create the model with img_size={hw[1]} or dynamic_img_size=True")


def fit_window_groupings(model: Backbone, hw: Tuple[int, int]) -> None:
    """Re-fit every ``window`` grouping of ``model`` to the maps of an ``hw`` input (``dynamic_img_size``): the
    window grouping is the one part sized by the map at build time (it shrinks the window to a smaller map)."""
    hw = model.patch_embed.out_size(hw)
    for stage in model.stage_list():
        hw = stage.downsample.out_size(hw) if hasattr(stage.downsample, "out_size") else hw
        for blk in stage.blocks:
            attn = getattr(blk, "attn", None)
            grouping = getattr(attn, "grouping", None)
            if getattr(grouping, "name", None) == "window" and tuple(grouping.grid) != tuple(hw):
                attn.layout = TokenLayout(hw)
                grouping.setup(attn)


def _dims(embed_dim: Union[int, Sequence[int]], n: int) -> Tuple[int, ...]:
    if isinstance(embed_dim, int):
        return tuple(embed_dim * 2 ** i for i in range(n))
    return _per_stage(tuple(int(d) for d in embed_dim), n, "embed_dim")


def _merge_kernels(merge_size: Sequence[Any], n: int) -> Tuple[Tuple[int, ...], ...]:
    """The kernels of each of the ``n - 1`` later embedding layers: one tuple of ints for all, or one per stage."""
    if all(isinstance(k, int) for k in merge_size):
        return (tuple(merge_size),) * (n - 1)
    return _per_stage(tuple(tuple(m) for m in merge_size), n - 1, "merge_size")


class CrossFormer(Backbone):
    """CrossFormer (Wang et al., ICLR 2022) whose parts are arguments; see the module docstring.

    Sizes: ``embed_dim`` (int: doubled per stage, or one per stage), ``depths``, ``num_heads``, ``group_size``
    (``G`` of SDA, int or per stage), ``lda_group_size`` (``G`` of LDA, default ``group_size``), ``patch_size``
    (the stem's kernels; its stride is the smallest), ``merge_size`` (the kernels of the later stages' CELs,
    stride 2: one tuple for all, or one per later stage), ``mlp_ratio``, ``dpb_residual``.  ``dynamic_img_size``: any input size (the window groups are
    re-fitted when the size changes).
    """

    stage_attr = "layers"

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Union[int, Sequence[int]] = 64, depths: Sequence[int] = (1, 1, 8, 6),
                 num_heads: Sequence[int] = (2, 4, 8, 16), group_size: Union[int, Sequence[int]] = 7,
                 lda_group_size: Optional[Union[int, Sequence[int]]] = None,
                 patch_size: Sequence[int] = (4, 8, 16, 32), merge_size: Sequence[Any] = (2, 4),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, dpb_residual: bool = False, mixer: str = "softmax",
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None, norm: str = "layernorm", norm_eps: float = 1e-5,
                 shortcut: str = "plain", branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None,
                 featscale: bool = False, wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, dynamic_img_size: bool = False,
                 architecture: str = "crossformer", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        n = len(depths)
        check_stage_sizes(depths, num_heads, 1, drop_path_rate)
        dims = _dims(embed_dim, n)
        sda = _per_stage(group_size, n, "group_size")
        lda = sda if lda_group_size is None else _per_stage(lda_group_size, n, "lda_group_size")
        merges = _merge_kernels(merge_size, n)
        img = int(img_size if isinstance(img_size, int) else img_size[0])
        self.num_classes, self.in_chans, self.img_size, self.dynamic_img_size = num_classes, in_chans, img, \
            dynamic_img_size
        self.embed_dim, self.num_features, self.depths = dims[0], dims[-1], depths
        self.patch_embed = CrossScaleEmbed(in_chans, dims[0], patch_size, min(patch_size), norm, norm_eps)
        hw = self.grid_size = self.patch_embed.out_size((img, img))
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)

        def down(i, hw):
            merge = CrossScaleEmbed(dims[i - 1], dims[i], merges[i - 1], 2, norm, norm_eps, norm_first=True)
            if min(merge.out_size(hw)) < 1:
                raise ValueError(f"img_size {img} is too small for {n} stages")
            return merge, merge.out_size(hw)

        def attend(st_spec, i, j, hw):
            return crossformer_attention(st_spec, lda[i] if j % 2 else sda[i], j % 2 == 1, dpb_residual, **attention)

        if min(hw) < 1:
            raise ValueError(f"img_size {img} is too small for a stride-{min(patch_size)} stem")
        self.layers = nn.ModuleList(build_stages(
            spec, stage_attn_types(spec, None, n, "group"), dims, depths, num_heads, hw, min(patch_size), down,
            attend, mlp_ratio, drop_rate, drop_path_rate, norm=norm, norm_eps=norm_eps, wiring=wiring,
            branch_scale=branch_scale or shortcut, branch_scale_init=shortcut_init, featscale=featscale))
        self.norm = create_norm(norm, self.num_features, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.875)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        fit_input_size(self, x)


# -- the official repository's state-dict layout ---------------------------------------------------
def crossformer_from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a state dict of the official CrossFormer code (cheerss/CrossFormer): the downsampler closing
    official stage ``i`` (``layers.{i}.downsample.{norm, reductions.k}``) opens vitlab's stage ``i + 1``
    (``layers.{i+1}.downsample.{norm, projs.k}``); the index buffers (``attn.biases``,
    ``attn.relative_position_index``) are dropped (vitlab computes them); ``{"model": sd}`` is unwrapped."""
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for k, v in state_dict.items():
        if re.search(r"\.attn\.(biases|relative_position_index)$", k) or k.endswith("attn_mask"):
            continue
        m = re.match(r"^layers\.(\d+)\.downsample\.(norm|reductions)\.(.*)$", k)
        if m:
            part = "projs" if m.group(2) == "reductions" else "norm"
            k = f"layers.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"
        out[k] = v
    return out


# -- registered recipes: the paper's Table 1 / official configs ----------------------------------------
_SIZES = {
    "tiny": dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.1),
    "small": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "base": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "large": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}
for _size, _cfg in _SIZES.items():
    register_recipe(CrossFormer, f"crossformer_{_size}", _cfg,
                    f"CrossFormer-{_size[0].upper()} (Wang et al., ICLR 2022), official config, G = 7.")
