"""Twins, built from vitlab parts.

"Twins: Revisiting the Design of Spatial Attention in Vision Transformers" (Chu, Tian, Wang, Zhang, Ren,
Wei, Xia & Shen, NeurIPS 2021).  Four stages, each opened by a non-overlapping patch embedding (a
``p x p`` stride-``p`` conv + LayerNorm: ``p = 4``, then 2) and holding pre-norm blocks; after the first
block of every stage a **PEG** (the conditional position code of CPVT, a 3x3 depthwise conv added to the
token map: :class:`vitlab.layers.peg.PEG`) gives the position information; no class token, a final
LayerNorm and the mean of the last stage's tokens.

* **Twins-PCPVT** (sec. 2.1): PVT's blocks, every one with spatial-reduction attention (the
  ``spatial_reduction`` grouping: keys and values from a stride-``sr`` conv + LayerNorm, the ``q_kv``
  projection), and the PEG instead of PVT's position tables.
* **Twins-SVT** (sec. 2.2): the blocks alternate **locally-grouped self-attention** (LSA: non-overlapping
  ``ws x ws`` windows without shift, the ``window`` grouping kept at ``ws`` and zero-padded on smaller maps
  as the official code) and **global sub-sampled attention** (GSA: the same spatial reduction as PCPVT).

Parts, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: refused by the
global sub-attention's reduced keys) / ``mixer_kwargs`` (in both kinds of attention; a linear-cost core such as
``focused_linear`` attends over all tokens of the stage, as FLatten does in PVT), ``norm`` (every LayerNorm),
``branch_scale`` (alias ``shortcut``) / ``shortcut_init``, ``featscale``, ``wiring``, ``init``; ``pos_code`` (a
:data:`~vitlab.layers.POS_CODES` name, or None).

State-dict keys: ``patch_embed.{proj,norm}``, ``stages.{i}.downsample.{proj,norm}``,
``stages.{i}.blocks.{j}.{norm1, attn.{qkv | q, kv, sr, norm}, attn.proj, norm2, mlp.fc1, mlp.fc2}``,
``stages.{i}.pos_block.proj.0``, ``norm``, ``head``; timm's ``patch_embeds.{i}``, ``blocks.{i}.{j}`` and
``pos_block.{i}`` are mapped by :mod:`vitlab.interop.timm_twins`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, create_pos_code, init_weights
from vitlab.layers.mixers import check_stage_kwargs
from vitlab.models.backbone import Backbone, ConvPatchEmbed, Stage
from vitlab.models.base import VitlabModel, make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.pvt import pvt_attention, stage_sizes

__all__ = ["Twins", "TwinsPatchEmbed", "twins_attention"]


def twins_attention(spec: MixerSpec, window: int, sr_ratio: int, norm: str, **attention: Any) -> Dict[str, Any]:
    """What a Twins block asks of its attention (Chu et al., 2021, sec. 2.2): ``window > 1`` is LSA (windows
    of ``window`` tokens a side, no shift, kept and zero-padded on a smaller map), else GSA (PVT's spatial
    reduction with ``sr_ratio``).  A linear-cost core attends over all tokens; a non-attention mixer takes
    none of it."""
    if not spec.attention or spec.linear_cost or window <= 1:
        return pvt_attention(spec, sr_ratio, False, norm, **attention)
    return dict(attention, grouping=("window", dict(window_size=window, fit_map=False)))


class TwinsPatchEmbed(ConvPatchEmbed):
    """A stage's patch embedding (a ``patch x patch`` stride-``patch`` conv + norm, LayerNorm eps 1e-5 as
    timm's) followed by the position dropout timm applies after it (``pos_drops``)."""

    def __init__(self, in_chans: int, out_chans: int, patch: int, norm: str = "layernorm", drop: float = 0.0):
        super().__init__(in_chans, out_chans, patch, patch, 0, norm, 1e-5)
        self.pos_drop = nn.Dropout(drop)

    def on_map(self, x: torch.Tensor):
        tokens, hw = super().on_map(x)
        return self.pos_drop(tokens), hw


def _per_stage(value: Any, n: int, what: str) -> Tuple[Any, ...]:
    t = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(t) != n:
        raise ValueError(f"{what} needs {n} values (one per stage), got {len(t)}: {t}")
    return t


class Twins(Backbone):
    """Twins-PCPVT (``wss=None``) and Twins-SVT (``wss``: LSA window per stage, every second block GSA)
    whose parts are arguments; see the module docstring.  Sizes and keyword names are timm's ``Twins``."""

    features_fmt = "NLC"  # timm's: forward_features gives the normalised tokens of the last stage
    _no_weight_decay_keys = VitlabModel._no_weight_decay_keys + ("pos_block",)  # timm's: the PEG convs too

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: Sequence[int] = (64, 128, 256, 512),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 depths: Sequence[int] = (3, 4, 6, 3), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 wss: Optional[Sequence[int]] = None, pos_code: Optional[str] = "peg", mixer: str = "softmax",
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None, norm: str = "layernorm", norm_eps: float = 1e-6,
                 shortcut: str = "plain", branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None,
                 featscale: bool = False, wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, architecture: str = "twins",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"Twins pools the mean of its last stage: global_pool must be 'avg', got {global_pool!r}")
        depths, dims, heads, mlp_ratios, sr_ratios = stage_sizes(depths, embed_dims, num_heads, mlp_ratios,
                                                                 sr_ratios, drop_path_rate)
        ns = len(depths)
        wss = _per_stage(wss, ns, "wss") if wss is not None else (1,) * ns
        img = img_size if isinstance(img_size, int) else img_size[0]
        if img % (patch_size * 2 ** (ns - 1)):
            raise ValueError(f"img_size {img} must be divisible by {patch_size * 2 ** (ns - 1)} (patch {patch_size}, "
                             f"then {ns - 1} stride-2 stages)")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.num_features = self.embed_dim = dims[-1]
        self.depths, self.wss = depths, wss
        self.patch_embed = TwinsPatchEmbed(in_chans, dims[0], patch_size, norm, pos_drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        block_kw = dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                        branch_scale_init=shortcut_init, total_depth=sum(depths), featscale=featscale)
        attention = dict(qkv_bias=True, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        self.stages = nn.ModuleList(self._build_stages(
            spec, self.patch_embed.out_size((img, img)), patch_size, dims, heads, mlp_ratios, depths, sr_ratios,
            wss, pos_code, attention, block_kw, proj_drop_rate, pos_drop_rate, drop_path_rate))
        self.norm = create_norm(norm, dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.9)

    def _build_stages(self, spec: MixerSpec, grid: Tuple[int, int], patch: int, dims, heads, mlp_ratios, depths,
                      sr_ratios, wss, pos_code: Optional[str], attention: Dict[str, Any], block_kw: Dict[str, Any],
                      proj_drop: float, pos_drop: float, drop_path_rate: float) -> List[Stage]:
        """Per stage: its patch embedding (none before the first: the stem), the blocks (LSA on even blocks
        where ``wss[i] > 1``, GSA elsewhere) and the position code after the first block."""
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        stages, asked, k = [], [], 0
        for i, depth in enumerate(depths):
            down = TwinsPatchEmbed(dims[i - 1], dims[i], 2, block_kw["norm"], pos_drop) if i else None
            grid = down.out_size(grid) if down is not None else grid
            blocks = []
            for j in range(depth):
                att = twins_attention(spec, wss[i] if j % 2 == 0 else 1, sr_ratios[i], block_kw["norm"], **attention)
                asked.append((spec, (), att))
                mixer = spec.build(dims[i], heads[i], TokenLayout(grid), lenient=True, **att)
                mlp = Mlp(dims[i], int(dims[i] * mlp_ratios[i]), drop=proj_drop)
                blocks.append(Block(dims[i], mixer, mlp, drop_path=dpr[k + j], **block_kw))
            k += depth
            peg = create_pos_code(pos_code, dims[i]) if pos_code is not None else None
            stages.append(Stage(blocks, dims[i], patch * 2 ** i, grid, downsample=down, pos_block=peg))
        check_stage_kwargs(spec.kwargs, asked)
        return stages

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        init_weights(self, init, conv_fan_out=True)  # the official code's fan-out conv init

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        side = self.stages[-1].reduction
        if x.shape[-2] < side or x.shape[-1] < side:
            raise ValueError(f"Twins needs inputs of at least {side}x{side} (its overall stride), got "
                             f"{x.shape[-2]}x{x.shape[-1]}")


# -- registered recipes (timm's names and sizes; Chu et al., 2021, Tables 1 and 2) -----------------------
_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
_SVT = dict(mlp_ratios=(4, 4, 4, 4), wss=(7, 7, 7, 7), sr_ratios=(8, 4, 2, 1))
_SIZES = {
    "pcpvt_small": dict(_PCPVT, depths=(3, 4, 6, 3)),
    "pcpvt_base": dict(_PCPVT, depths=(3, 4, 18, 3)),
    "pcpvt_large": dict(_PCPVT, depths=(3, 8, 27, 3)),
    "svt_small": dict(_SVT, embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4)),
    "svt_base": dict(_SVT, embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2)),
    "svt_large": dict(_SVT, embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2)),
}

for _size, _cfg in _SIZES.items():
    _kind, _scale = _size.split("_")
    register_recipe(Twins, f"twins_{_size}", dict(_cfg, patch_size=4),
                    f"Twins-{_kind.upper()}-{_scale[0].upper()} (Chu et al., NeurIPS 2021), timm's sizes.",
                    crop_pct=0.9)
