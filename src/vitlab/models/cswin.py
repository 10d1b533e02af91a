"""CSwin Transformer, built from vitlab parts.

"CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows" (Dong
et al., CVPR 2022).  In each block the heads are split in two halves: one attends inside
vertical stripes ``(H, sw)``, the other inside horizontal stripes ``(sw, W)``; the last stage
(and any stage whose stripe covers the map) uses one branch over the whole map.  LePE (a 3x3
depthwise conv on V, run on each stripe separately) is added to every branch's output.

The token mixer is any vitlab mixer: its ``qkv`` / ``proj`` are the block's projections and its
attention core (``softmax``, ``cosine``, ``attnscale``) runs per stripe; a ``focused_linear``
stage ("FLatten Transformer", Han et al., ICCV 2023) attends over the whole map in one branch
(linear cost) plus its depthwise conv and LePE.  LipsFormer's CSwin ("LipsFormer", Qi et al.,
ICLR 2023) is ``norm_layout="end"`` (one norm at the end of each block), ``conv_units=True``,
``lepe_div_heads=True``, a 4x4 stem, 2x2 merges and no final norm.

State-dict layout: ``patch_embed.{proj,norm}``, ``layers.{i}.downsample.{proj,norm}``,
``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.lepe.{b}, norm2, mlp.fc1, mlp.fc2}``,
``norm``, ``head`` (the official code's ``stage1_conv_embed`` / ``stage{i}`` / ``merge{i}`` /
``attns.{b}.get_v`` hold the same tensors).

Attention recording: a two-branch block on a square map records one tensor per forward,
``(B * H/sw, heads, H*sw, H*sw)``: heads ``[0, heads/2)`` hold the vertical stripes (stripe ``s``
of image ``b`` is row ``b * H/sw + s``, tokens in raster order inside the ``H x sw`` stripe),
heads ``[heads/2, heads)`` the horizontal ones (``sw x W``).  A block built on a non-square map
records two tensors (vertical, then horizontal).  Single-branch blocks record
``(B, heads, H*W, H*W)``.  No matrix over the whole map is formed in two-branch stages.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from vitlab.layers import MixerSpec, create_norm, init_weights
from vitlab.models.backbone import Backbone, ConvPatchEmbed
from vitlab.models.base import crop_pct_by_size, make_default_cfg, register_recipe
from vitlab.models.swin import _per_stage, build_stages, check_stage_sizes, stage_attn_types

__all__ = ["CSwinTransformer", "cswin_attention", "ConvEmbed", "cswin_from_official", "cswin_to_official"]

NORM_LAYOUTS = ("pre", "post", "end", "parallel")


class ConvEmbed(ConvPatchEmbed):
    """Strided conv + norm on the token map: CSwin's stem (7x7/4) and merge (3x3/2) blocks
    (Dong et al., 2022); LipsFormer-CSwin uses 4x4/4 and 2x2/2."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int, norm: str = "layernorm",
                 norm_eps: float = 1e-5):
        super().__init__(in_chans, out_chans, kernel, stride, max(kernel - stride + 1, 0) // 2, norm, norm_eps)


def cswin_attention(spec: MixerSpec, split_size: int, single: bool, lepe_div_heads: bool,
                    **attention: Any) -> Dict[str, Any]:
    """What CSwin asks of a stage's attention: cross-shaped stripes plus LePE (Dong et al., 2022); one
    branch over the whole map (plus LePE) for a linear-cost core (FLatten, Han et al., ICCV 2023);
    nothing for a non-attention mixer."""
    if not spec.attention:
        return {}
    lepe = ("lepe", dict(div_heads=lepe_div_heads))
    if spec.linear_cost:
        return dict(attention, position=(lepe,))
    return dict(attention, grouping=("stripes", dict(split_size=split_size, single=single)), position=(lepe,))


class CSwinTransformer(Backbone):
    """CSwin Transformer whose parts are arguments (Dong et al., CVPR 2022).

    Args beyond the sizes (``embed_dim``, ``depths``, ``num_heads``, ``split_size`` per stage,
    ``mlp_ratio``): ``mixer``, ``attn_type`` (``L``/``S`` per stage as in
    :class:`~vitlab.models.swin.SwinTransformer`), ``norm``, ``norm_eps``, ``shortcut``,
    ``shortcut_init``, ``featscale``, ``init``, ``norm_layout`` (``pre``/``post``/``end``/``parallel``;
    ``wiring`` is its alias),
    ``conv_units``, ``lepe_div_heads``, ``stem_kernel`` (7: 7x7/4 conv, 4: 4x4/4),
    ``merge_kernel`` (3: 3x3/2, 2: 2x2/2), ``final_norm``, ``mixer_kwargs``, ``core`` / ``modifiers`` /
    ``attn_position`` (position parts after LePE, e.g. ``("rope",)``: coordinates inside each stripe).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths: Sequence[int] = (1, 2, 21, 1), num_heads: Sequence[int] = (2, 4, 8, 16),
                 split_size: Sequence[int] = (1, 2, 7, 7), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mixer: str = "softmax", attn_type: Optional[str] = None, norm: str = "layernorm",
                 norm_eps: float = 1e-5, shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, init: str = "trunc_normal", norm_layout: str = "pre",
                 wiring: Optional[str] = None,
                 conv_units: bool = False, lepe_div_heads: bool = False, stem_kernel: int = 7,
                 merge_kernel: int = 3, final_norm: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (), branch_scale: Optional[str] = None,
                 architecture: str = "cswin", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        n_stages = len(depths)
        check_stage_sizes(depths, num_heads, embed_dim, drop_path_rate)
        if stem_kernel not in (4, 7) or merge_kernel not in (2, 3):
            raise ValueError(f"stem_kernel must be 7 (CSwin) or 4 (LipsFormer) and merge_kernel 3 or 2, "
                             f"got {stem_kernel}, {merge_kernel}")
        norm_layout = wiring or norm_layout  # wiring=: the name every family takes
        if norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout must be one of {NORM_LAYOUTS}, got {norm_layout!r}")
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        attn_type = stage_attn_types(spec, attn_type, n_stages, "stripe")
        splits = _per_stage(split_size, n_stages, "split_size")
        if isinstance(img_size, (tuple, list)):
            if img_size[0] != img_size[1]:
                raise ValueError(f"CSwinTransformer takes square images, got img_size={img_size}")
            img_size = img_size[0]
        self.img_size = int(img_size)
        self.num_classes, self.in_chans, self.attn_type = num_classes, in_chans, attn_type
        dims = [int(embed_dim * 2 ** i) for i in range(n_stages)]
        self.embed_dim, self.num_features = embed_dim, dims[-1]
        self.patch_embed = ConvEmbed(in_chans, embed_dim, stem_kernel, 4, norm, norm_eps)
        hw = self.grid_size = self.patch_embed.out_size((self.img_size, self.img_size))
        if min(hw) < 1:
            raise ValueError(f"img_size {img_size} is too small for a stride-4 stem")
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)

        def down(i, hw):
            merge = ConvEmbed(dims[i - 1], dims[i], merge_kernel, 2, norm, norm_eps)
            if min(merge.out_size(hw)) < 1:
                raise ValueError(f"img_size {img_size} is too small for {n_stages} stages")
            return merge, merge.out_size(hw)

        def attend(st_spec, i, j, hw):
            return cswin_attention(st_spec, splits[i], i == n_stages - 1, lepe_div_heads, **attention)

        self.layers = nn.ModuleList(build_stages(
            spec, attn_type, dims, depths, num_heads, hw, 4, down, attend, mlp_ratio, drop_rate, drop_path_rate,
            norm=norm, norm_eps=norm_eps, wiring=norm_layout, branch_scale=branch_scale or shortcut,
            branch_scale_init=shortcut_init, featscale=featscale, conv_units=conv_units))
        self.norm = create_norm(norm, self.num_features, eps=norm_eps) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.img_size, num_classes, in_chans,
                                                           crop_pct=0.9)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input image size {x.shape[-2]}x{x.shape[-1]} does not match the model's img_size "
                             f"{self.img_size}x{self.img_size}; create the model with img_size={x.shape[-1]}")

    stage_attr = "layers"

# -- the official CSwin repository's state-dict layout ---------------------------------------------
_OFFICIAL_TO_VITLAB = [
    (r"^stage1_conv_embed\.0\.", "patch_embed.proj."),
    (r"^stage1_conv_embed\.2\.", "patch_embed.norm."),
    (r"^merge(\d+)\.conv\.", lambda m: f"layers.{m.group(1)}.downsample.proj."),
    (r"^merge(\d+)\.norm\.", lambda m: f"layers.{m.group(1)}.downsample.norm."),
    (r"^stage(\d+)\.(\d+)\.attns\.(\d+)\.get_v\.",
     lambda m: f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}.attn.lepe.{m.group(3)}."),
    (r"^stage(\d+)\.(\d+)\.(qkv|proj)\.",
     lambda m: f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}.attn.{m.group(3)}."),
    (r"^stage(\d+)\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
]
_VITLAB_TO_OFFICIAL = [
    (r"^patch_embed\.proj\.", "stage1_conv_embed.0."),
    (r"^patch_embed\.norm\.", "stage1_conv_embed.2."),
    (r"^layers\.(\d+)\.downsample\.proj\.", lambda m: f"merge{m.group(1)}.conv."),
    (r"^layers\.(\d+)\.downsample\.norm\.", lambda m: f"merge{m.group(1)}.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.lepe\.(\d+)\.",
     lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}.attns.{m.group(3)}.get_v."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.(qkv|proj)\.",
     lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}."),
]


def _rename(sd: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    import re

    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def cswin_from_official(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Rename a state dict of the official CSwin code ("CSWin Transformer", Dong et al., CVPR
    2022: ``stage1_conv_embed.{0,2}``, ``stage{s}.{j}.{qkv,proj,attns.{b}.get_v,...}``,
    ``merge{i}.{conv,norm}``) to vitlab's keys; ``{"state_dict_ema" | "state_dict" | "model": sd}``
    wrappers are unwrapped (the EMA weights first, which the released models report)."""
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return _rename(state_dict, _OFFICIAL_TO_VITLAB)


def cswin_to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`cswin_from_official`: vitlab keys to the official CSwin code's."""
    return _rename(state_dict, _VITLAB_TO_OFFICIAL)


# -- registered recipes -------------------------------------------------------------------------
def _split_at_384(kw: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    if kw.get("img_size", 224) >= 384 and "split_size" not in overrides:
        # the official 384 models (CSWin-B@384, FLatten-CSwin-B@384): stripes 12 in stages 3-4
        kw["split_size"] = tuple(kw["split_size"][:2]) + (12, 12)
    return kw


def _register_cswin(name: str, defaults: Dict[str, Any], doc: str) -> None:
    register_recipe(CSwinTransformer, name, defaults, f"{name}: {doc} ({defaults}).", _split_at_384,
                    crop_pct=crop_pct_by_size)


_CSWIN_T = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7),
                drop_path_rate=0.2)
_register_cswin("cswin_tiny_224", _CSWIN_T, "CSwin-T (Dong et al., CVPR 2022)")
# LipsFormer-CSwin-T (Qi et al., ICLR 2023, spec section 8): cosine attention tau 12, CenterNorm at
# the end of each block, weighted shortcuts alpha_0 = 0.2, spectral init, conv units, LePE / sqrt(heads),
# 4x4 stem, 2x2 merges, no final norm.
_register_cswin("lipsformer_cswin_tiny",
                dict(_CSWIN_T, mixer="cosine", mixer_kwargs=dict(tau=12.0), norm="center", shortcut="weighted",
                     shortcut_init=0.2, init="spectral", norm_layout="end", conv_units=True, lepe_div_heads=True,
                     stem_kernel=4, merge_kernel=2, final_norm=False),
                "LipsFormer (Qi et al., ICLR 2023) CSwin-T")
# FLatten-CSwin-T (Han et al., ICCV 2023): depths 2,4,18,1; focused linear attention over the whole
# map in stages 1-2 (plus LePE), cross-shaped windows (stripes 7) in stages 3-4.
_register_cswin("flatten_cswin_tiny",
                dict(_CSWIN_T, depths=(2, 4, 18, 1), attn_type="LLSS",
                     mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5)),
                "FLatten (Han et al., ICCV 2023) CSwin-T")
