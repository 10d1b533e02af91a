"""SepViT, built from vitlab parts.

"SepViT: Separable Vision Transformer" (Li, Wang, Xia, Wu, Li, Xiao, Zheng & Wen, arXiv 2203.15380, 2022).
Four stages, each opened by an overlapping patch embedding (a 7x7 stride-4 conv, then 3x3 stride-2 convs,
zero padding, + LayerNorm), holding pre-norm blocks whose attention is **depthwise separable self-attention**
(sec. 3.2: the ``separable`` grouping of :mod:`vitlab.layers.separable`, window tokens + attention inside
each window, then attention across windows); the blocks of stages 2 and 3 alternate 7x7 windows with
14x14 ones ("grouped self-attention", sec. 3.3).  After the first block of every stage a PEG (CPVT's
conditional position code, :class:`vitlab.layers.peg.PEG`); a final LayerNorm and the mean of the last
stage's tokens.  Details not in the paper follow the official code (``liwei109/SepViT``,
``classification/sepvit.py``): block norms eps 1e-6, patch-embedding norms eps 1e-5, the window sizes per
block, zero-initialised window tokens, the shortcut inside the attention, the conv init.

One departure: the official block concatenates the window tokens *before* its ``norm1``; vitlab's mixer
sees tokens after the block's norm, so the window tokens enter normalised already (``norm1`` of a learned
constant is a learned constant: a converter of official weights stores ``norm1(win_tokens)``; both start at
zero).

Parts, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: coordinates inside
each window) / ``mixer_kwargs`` (a linear-cost core such as ``focused_linear`` attends over all tokens of the stage
without windows, FLatten's rule), ``norm`` (every LayerNorm), ``branch_scale`` (alias ``shortcut``) / ``shortcut_init``,
``featscale``, ``wiring``, ``init``; ``pos_code`` (a :data:`~vitlab.layers.POS_CODES` name, or None).

State-dict keys (timm has no SepViT): ``patch_embed.{proj,norm}``, ``stages.{i}.downsample.{proj,norm}``,
``stages.{i}.blocks.{j}.{norm1, attn.{qkv, win_tokens, psa.norm, psa.qk, proj}, norm2, mlp.fc1, mlp.fc2}``,
``stages.{i}.pos_block.proj.0``, ``norm``, ``head``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, create_pos_code, init_weights
from vitlab.layers.mixers import check_stage_kwargs
from vitlab.models.backbone import Backbone, ConvPatchEmbed, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.pvt import stage_sizes

__all__ = ["SepViT", "SepViTPatchEmbed", "sepvit_attention"]


def sepvit_attention(spec: MixerSpec, window: int, norm: str, **attention: Any) -> Dict[str, Any]:
    """What a SepViT block asks of its attention (Li et al., 2022, sec. 3.2): separable windows of ``window``
    a side.  A linear-cost core attends over all tokens; a non-attention mixer takes none of it."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    return dict(attention, grouping=("separable", dict(window_size=window, norm=norm)))


class SepViTPatchEmbed(ConvPatchEmbed):
    """Overlapping patch embedding (``kernel`` conv, stride ``stride``, padding ``kernel // 2``, LayerNorm eps
    1e-5), then the dropout the official code applies after it (``pos_drops``)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int, norm: str = "layernorm",
                 drop: float = 0.0):
        super().__init__(in_chans, out_chans, kernel, stride, kernel // 2, norm, 1e-5)
        self.pos_drop = nn.Dropout(drop)

    def on_map(self, x: torch.Tensor):
        tokens, hw = super().on_map(x)
        return self.pos_drop(tokens), hw


def _window_sizes(value: Any, n: int) -> Tuple[Tuple[int, ...], ...]:
    """One tuple of window sizes per stage (cycled over its blocks) from an int, or one int / tuple per stage."""
    per = (value,) * n if isinstance(value, int) else tuple(value)
    if len(per) != n:
        raise ValueError(f"window_size needs one entry per stage ({n} stages), got {value!r}")
    out = tuple((w,) if isinstance(w, int) else tuple(w) for w in per)
    if any(not ws or any(not isinstance(w, int) or w < 1 for w in ws) for ws in out):
        raise ValueError(f"window_size entries must be positive ints or non-empty tuples of them, got {value!r}")
    return out


class SepViT(Backbone):
    """SepViT (Li et al., 2022) whose parts are arguments; see the module docstring.  ``window_size``: an int
    for every block, or one int / tuple per stage (a tuple cycles over the stage's blocks: ``(7, 14)`` alternates
    depthwise separable and grouped self-attention).  The window tokens fix the input size to ``img_size``."""

    features_fmt = "NLC"  # as Twins: forward_features gives the normalised tokens of the last stage

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: Sequence[int] = (96, 192, 384, 768), num_heads: Sequence[int] = (3, 6, 12, 24),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), depths: Sequence[int] = (1, 2, 6, 2),
                 window_size: Any = ((7,), (7, 14), (7, 14), (7,)), qkv_bias: bool = True,
                 pos_code: Optional[str] = "peg", mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, shortcut: str = "plain",
                 branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, architecture: str = "sepvit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"SepViT pools the mean of its last stage: global_pool must be 'avg', got {global_pool!r}")
        depths, dims, heads, mlp_ratios, _ = stage_sizes(depths, embed_dims, num_heads, mlp_ratios,
                                                         (1,) * len(tuple(depths)), drop_path_rate)
        windows = _window_sizes(window_size, len(depths))
        img = img_size if isinstance(img_size, int) else img_size[0]
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.num_features = self.embed_dim = dims[-1]
        self.patch_embed = SepViTPatchEmbed(in_chans, dims[0], 7, 4, norm, drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        block_kw = dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                        branch_scale_init=shortcut_init, total_depth=sum(depths), featscale=featscale)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        self.stages = nn.ModuleList(self._build_stages(
            spec, self.patch_embed.out_size((img, img)), dims, heads, mlp_ratios, depths, windows, pos_code,
            attention, block_kw, drop_rate, drop_path_rate))
        self.norm = create_norm(norm, dims[-1], eps=norm_eps)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.9)

    def _build_stages(self, spec: MixerSpec, grid: Tuple[int, int], dims, heads, mlp_ratios, depths, windows,
                      pos_code: Optional[str], attention: Dict[str, Any], block_kw: Dict[str, Any], drop: float,
                      drop_path_rate: float) -> List[Stage]:
        """Per stage: its patch embedding (none before the first: the stem), the blocks (window sizes cycled from
        ``windows[i]``) and the position code after the first block."""
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        stages, asked, k = [], [], 0
        for i, depth in enumerate(depths):
            down = SepViTPatchEmbed(dims[i - 1], dims[i], 3, 2, block_kw["norm"], drop) if i else None
            grid = down.out_size(grid) if down is not None else grid
            blocks = []
            for j in range(depth):
                att = sepvit_attention(spec, windows[i][j % len(windows[i])], block_kw["norm"], **attention)
                asked.append((spec, (), att))
                mixer = spec.build(dims[i], heads[i], TokenLayout(grid), lenient=True, **att)
                mlp = Mlp(dims[i], int(dims[i] * mlp_ratios[i]), drop=drop)
                blocks.append(Block(dims[i], mixer, mlp, drop_path=dpr[k + j], **block_kw))
            k += depth
            peg = create_pos_code(pos_code, dims[i]) if pos_code is not None else None
            stages.append(Stage(blocks, dims[i], 4 * 2 ** i, grid, downsample=down, pos_block=peg))
        check_stage_kwargs(spec.kwargs, asked)
        return stages

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        init_weights(self, init, conv_fan_out=True)  # the official code's fan-out conv init

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        fixed = any(n.endswith("win_tokens") for n, _ in self.named_parameters())
        if fixed and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"SepViT learns one token per attention window, so it takes {self.img_size}x"
                             f"{self.img_size} inputs only (its img_size), got {x.shape[-2]}x{x.shape[-1]}")


# -- registered recipes (Li et al., 2022, Table 1; window sizes per block as the official code) -------------------
_WINDOWS_TSB = ((7,), (7, 14), (7, 14), (7,))  # stage 1: 56/7; stages 2-3 alternate DSSA (7) and GSSA (14)
_SIZES = {
    "lite": dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 2, 6, 2)),  # official code only
    "tiny": dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(1, 2, 6, 2)),
    "small": dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(1, 2, 14, 2)),
    "base": dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(1, 2, 14, 2)),
}

for _size, _cfg in _SIZES.items():
    register_recipe(SepViT, f"sepvit_{_size}", dict(_cfg, window_size=_WINDOWS_TSB),
                    f"SepViT-{_size.capitalize()} (Li et al., 2022), the official code's sizes.", crop_pct=0.9)
