"""Swin Transformer, built from vitlab parts.

"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al., ICCV
2021).  Window attention is *any* vitlab mixer run on the tokens of each window, with the
relative position bias (plus the shifted-window mask) handed to it as ``bias=``; stages whose
mixer is ``focused_linear`` attend over one global window (no bias, no shift), as in "FLatten
Transformer" (Han et al., ICCV 2023).  LipsFormer's Swin ("LipsFormer", Qi et al., ICLR 2023)
is the same backbone with ``post_norm=True, conv_units=True, shift=False`` and its parts.

State-dict keys equal timm's ``swin_*`` models (``patch_embed.proj``, ``patch_embed.norm``,
``layers.{i}.downsample.{norm,reduction}``, ``layers.{i}.blocks.{j}.norm1``,
``...attn.relative_position_bias_table``, ``...attn.qkv``, ``...attn.proj``, ``...norm2``,
``...mlp.fc1/fc2``, ``norm``) except the classifier, ``head`` here and ``head.fc`` in timm
(:mod:`vitlab.interop.timm_swin` maps it).  vitlab-only parts add ``...featscale.{s,t}``,
``...attn.attn_scale.omega``, ``...ls1.gamma``/``ls2.gamma`` (weighted shortcut),
``...conv_units.{0,1}.*`` and the focused-linear mixer's ``dwc``, ``scale_param``, ``pos_enc``.

Attention recording (:func:`vitlab.layers.record_attention`): window stages record one
``(B * nW, heads, M*M, M*M)`` tensor per block (windows batch-major, raster order inside the
window, the shifted map for shifted blocks); global focused-linear stages record
``(B, heads, H*W, H*W)``, the implied linear-attention matrix.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import Mlp, MixerSpec, PatchEmbed, TokenLayout, create_norm, init_weights
from vitlab.layers.linear import Linear
from vitlab.layers.mixers import check_stage_kwargs
from vitlab.layers.window import REL_POS_RESIZE_METHODS
from vitlab.models.backbone import Backbone, Stage
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.base import crop_pct_by_size, make_default_cfg, register_recipe

__all__ = ["SwinTransformer", "swin_attention", "PatchMerging", "stage_attn_types", "linear_spec", "build_stages"]


def check_stage_sizes(depths: Tuple[int, ...], num_heads: Tuple[int, ...], embed_dim: int,
                      drop_path_rate: float) -> None:
    """One error per bad size of a hierarchical backbone (Swin, CSwin)."""
    if len(depths) < 1 or len(num_heads) != len(depths):
        raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
    if any(d < 1 for d in depths) or embed_dim < 1:
        raise ValueError(f"depths and embed_dim must be positive, got depths={depths}, embed_dim={embed_dim}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")


def build_stages(spec: MixerSpec, attn_type: str, dims: Sequence[int], depths: Sequence[int],
                 num_heads: Sequence[int], hw: Tuple[int, int], stride: int, make_down, make_attention,
                 mlp_ratio: float, drop_rate: float, drop_path_rate: float, **block_kw: Any) -> List[Stage]:
    """The :class:`Stage` s of a hierarchical backbone (Swin, CSwin) whose stem has input stride
    ``stride`` and map ``hw``: per stage a downsampler (``make_down(i, hw) -> (module, hw)``, none before
    the first; each halves the map) and blocks whose attention is ``make_attention(stage_spec, i, j,
    hw)``; ``L`` stages run FLatten's linear attention.  Every ``mixer_kwargs`` key must be used by
    some stage."""
    total = sum(depths)
    dpr = drop_path_rates(drop_path_rate, total)
    stages, k, asked = [], 0, []
    for i in range(len(depths)):
        down = None
        if i > 0:
            down, hw = make_down(i, hw)
        st_spec = spec if attn_type[i] == "S" or spec.linear_cost else linear_spec(spec)
        blocks = []
        for j in range(depths[i]):
            att = make_attention(st_spec, i, j, hw)
            asked.append((st_spec, (), att))
            mixer = st_spec.build(dims[i], num_heads[i], TokenLayout(hw), lenient=True, **att)
            blocks.append(Block(dims[i], mixer, Mlp(dims[i], int(dims[i] * mlp_ratio), drop=drop_rate),
                                drop_path=dpr[k + j], total_depth=total, **block_kw))
        k += depths[i]
        stages.append(Stage(blocks, dims[i], stride * 2 ** i, hw, downsample=down))
    check_stage_kwargs(spec.kwargs, asked)
    return stages


def linear_spec(spec: MixerSpec) -> MixerSpec:
    """The mixer of an ``L`` stage: FLatten's focused linear attention, with the user's options."""
    return MixerSpec("focused_linear", None, tuple(spec.modifiers), dict(spec.kwargs), spec.position)


def stage_attn_types(spec: MixerSpec, attn_type: Optional[str], n_stages: int, what: str) -> str:
    """One letter per stage: ``L`` (a linear-cost core over the whole map) or ``S`` (``spec`` in the
    family's local groups); default all ``L`` for a linear-cost ``spec``, else all ``S``."""
    if attn_type is None:
        attn_type = ("L" if spec.linear_cost else "S") * n_stages
    if not isinstance(attn_type, str) or len(attn_type) != n_stages or set(attn_type) - {"L", "S"}:
        raise ValueError(f"attn_type must be a string of {n_stages} letters 'L' (focused linear, global) or "
                         f"'S' (the {what} mixer), one per stage, got {attn_type!r}")
    if spec.linear_cost and "S" in attn_type:
        core = f" (core={spec.core!r})" if spec.core else ""
        raise ValueError(f"attn_type {attn_type!r} asks for {what} stages ('S'), but mixer={spec.mixer!r}{core} "
                         "has linear cost and attends over the whole map; use "
                         "mixer='softmax' (or 'cosine', 'attnscale') for the 'S' stages")
    return attn_type


def _per_stage(value, n: int, what: str) -> Tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} needs one value per stage ({n} stages), got {value!r}")
        return tuple(value)
    return (value,) * n


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (``4C``), normalise, project to ``out_dim`` without
    bias (Swin's downsampling; Liu et al., 2021).  Odd maps are zero-padded, as in timm.
    ``norm_after``: project, then normalise the ``out_dim`` channels (Swin V2, Liu et al., CVPR 2022; timm)."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm: str = "layernorm", norm_eps: float = 1e-5,
                 norm_after: bool = False):
        super().__init__()
        self.dim, self.out_dim, self.norm_after = dim, out_dim or 2 * dim, norm_after
        self.norm = create_norm(norm, self.out_dim if norm_after else 4 * dim, eps=norm_eps)
        self.reduction = Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, Tuple[int, int]]:
        b, n, c = x.shape
        h, w = layout.hw
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        # timm/official order of the four neighbours: (0,0), (1,0), (0,1), (1,1)
        x = x.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c)
        y = self.norm(self.reduction(x)) if self.norm_after else self.reduction(self.norm(x))
        return y, (h2, w2)


def swin_attention(spec: MixerSpec, dim: int, hw: Tuple[int, int], num_heads: int, window_size: int, shift: bool,
                   rel_pos_bias: bool = True, **attention: Any) -> Dict[str, Any]:
    """What Swin asks of a stage's attention: shifted windows with a relative position table (Liu et
    al., 2021); one global window for a linear-cost core (FLatten, Han et al., ICCV 2023); nothing
    for a non-attention mixer, which mixes over the whole map."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    return dict(attention, grouping=("window", dict(window_size=window_size, shift=shift)),
                position=("relative",) if rel_pos_bias else ())


class SwinTransformer(Backbone):
    """Swin Transformer whose parts are arguments (Liu et al., ICCV 2021).

    Args beyond the Swin sizes (``embed_dim``, ``depths``, ``num_heads``, ``window_size`` (int
    or one per stage), ``mlp_ratio``): ``mixer`` (softmax-family mixer of the window stages),
    ``attn_type`` (one letter per stage: ``L`` = ``focused_linear`` over one global window,
    ``S`` = ``mixer``; default all ``S``, or all ``L`` when ``mixer="focused_linear"``),
    ``norm``, ``norm_eps``, ``shortcut``, ``shortcut_init``, ``featscale``, ``init``, ``shift``
    (shifted windows in every second block), ``post_norm`` / ``wiring`` (the Block's), ``conv_units``, ``rel_pos_bias``,
    ``mixer_kwargs`` (handed to every mixer; each ignores what it does not use), ``core`` / ``modifiers`` /
    ``attn_position`` (position parts added after the relative table, e.g. ``("rope",)``: window coordinates),
    ``rel_pos_resize`` (how :meth:`load_state_dict` resizes relative position tables of a
    checkpoint trained with another window: ``"timm"`` as timm's ``checkpoint_filter_fn``,
    ``"bicubic"`` as the official Swin code), ``proj_drop_rate`` (attention output and MLP dropout; default
    ``drop_rate``, as timm's Swin), ``merge_norm_after`` (:class:`PatchMerging`'s ``norm_after``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Union[int, Sequence[int]] = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mixer: str = "softmax", attn_type: Optional[str] = None, norm: str = "layernorm",
                 norm_eps: float = 1e-5, shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, init: str = "trunc_normal", shift: bool = True, post_norm: bool = False,
                 wiring: Optional[str] = None,
                 conv_units: bool = False, rel_pos_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, rel_pos_resize: str = "timm",
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 branch_scale: Optional[str] = None, proj_drop_rate: Optional[float] = None,
                 merge_norm_after: bool = False,
                 architecture: str = "swin", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        n_stages = len(depths)
        if rel_pos_resize not in REL_POS_RESIZE_METHODS:
            raise ValueError(f"rel_pos_resize must be one of {REL_POS_RESIZE_METHODS}, got {rel_pos_resize!r}")
        self.rel_pos_resize = rel_pos_resize
        check_stage_sizes(depths, num_heads, embed_dim, drop_path_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        attn_type = stage_attn_types(spec, attn_type, n_stages, "window")
        windows = _per_stage(window_size, n_stages, "window_size")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.depths, self.attn_type = depths, attn_type
        dims = [int(embed_dim * 2 ** i) for i in range(n_stages)]
        self.embed_dim = embed_dim
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      norm_layer=create_norm(norm, embed_dim, eps=norm_eps))
        self.grid_size = self.patch_embed.grid_size
        proj_drop = drop_rate if proj_drop_rate is None else proj_drop_rate  # timm's Swin V1: one rate for both
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop)

        def down(i, hw):
            return (PatchMerging(dims[i - 1], dims[i], norm=norm, norm_eps=norm_eps, norm_after=merge_norm_after),
                    ((hw[0] + 1) // 2, (hw[1] + 1) // 2))

        def attend(st_spec, i, j, hw):
            return self.window_attention(st_spec, i, dims[i], hw, num_heads[i], windows[i], shift and j % 2 == 1,
                                         rel_pos_bias, **attention)

        self.layers = nn.ModuleList(build_stages(
            spec, attn_type, dims, depths, num_heads, self.grid_size, patch_size, down, attend, mlp_ratio, proj_drop,
            drop_path_rate, norm=norm, norm_eps=norm_eps, wiring=wiring or ("post" if post_norm else "pre"),
            branch_scale=branch_scale or shortcut, branch_scale_init=shortcut_init, featscale=featscale,
            conv_units=conv_units))
        self.norm = create_norm(norm, self.num_features, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.patch_embed.img_size[0], num_classes,
                                                           in_chans, crop_pct=0.9)

    stage_attr = "layers"

    def window_attention(self, spec: MixerSpec, stage: int, dim: int, hw: Tuple[int, int], num_heads: int,
                         window: int, shift: bool, rel_pos_bias: bool, **attention: Any) -> Dict[str, Any]:
        """The attention parts of stage ``stage``'s blocks (:func:`swin_attention`; Swin V2 overrides it)."""
        return swin_attention(spec, dim, hw, num_heads, window, shift, rel_pos_bias, **attention)


# -- registered recipes -------------------------------------------------------------------------
_SWIN_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}
# LipsFormer (Qi et al., ICLR 2023) on Swin: cosine attention (tau 10) + relative position bias,
# CenterNorm everywhere, weighted shortcuts (alpha_0 = 1/L), spectral init, post-norm blocks,
# two depthwise-conv units per block, no shifted windows.
_LIPSFORMER = dict(mixer="cosine", norm="center", shortcut="weighted", init="spectral", post_norm=True,
                   conv_units=True, shift=False, mixer_kwargs=dict(tau=10.0))
# FLatten (Han et al., ICCV 2023): focused linear attention (p=3, DWC k=5) over one global
# window in stages 1-2, Swin's shifted windows in stages 3-4.
_FLATTEN = dict(attn_type="LLSS", mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5))


def _register_swin(name: str, size: str, extra: Optional[Dict[str, Any]] = None, img_size: int = 224,
                   doc: str = "", **cfg: Any) -> None:
    defaults = dict(_SWIN_SIZES[size], img_size=img_size, **(extra or {}))

    def adjust(kw: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
        if name.startswith("flatten_") and "window_size" not in overrides and kw["img_size"] >= 384:
            kw["window_size"] = 12  # FLatten-Swin@384: window-12 softmax stages (spec flatten.md section 5)
        return kw

    register_recipe(SwinTransformer, name, defaults, f"{name}: {doc or 'Swin'}-{size[0].upper()} ({defaults}).",
                    adjust, **{"crop_pct": crop_pct_by_size, **cfg})


for _size in ("tiny", "small", "base"):
    _register_swin(f"swin_{_size}_patch4_window7_224", _size, doc="Swin (Liu et al., ICCV 2021)")
    _register_swin(f"lipsformer_swin_{_size}", _size, _LIPSFORMER, doc="LipsFormer (Qi et al., ICLR 2023) Swin")
    _register_swin(f"flatten_swin_{_size}", _size, _FLATTEN, doc="FLatten (Han et al., ICCV 2023) Swin")
_register_swin("swin_base_patch4_window12_384", "base", dict(window_size=12), img_size=384, crop_pct=1.0,
               doc="Swin (Liu et al., ICCV 2021) at 384, window 12")
# Anti-oversmoothing (Wang et al., ICLR 2022) on Swin-S: AttnScale in every window attention
# (N = tokens per window), FeatScale on the merged attention output of the whole stage map.
_register_swin("attnscale_swin_small", "small", dict(mixer="attnscale"), doc="AttnScale (Wang et al., ICLR 2022) Swin")
_register_swin("featscale_swin_small", "small", dict(featscale=True), doc="FeatScale (Wang et al., ICLR 2022) Swin")

