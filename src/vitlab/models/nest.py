"""NesT, built from vitlab parts.

"Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and Interpretable Visual Understanding"
(Zhang, Zhang, Zhao, Chen, Arik & Pfister, AAAI 2022).  A 4x4 patch embedding, then ``num_levels`` levels
(sec. 3.1): level ``i`` cuts its map into non-overlapping square *image blocks* of ``block_size`` tokens a side
(``4 ** (num_levels - 1 - i)`` of them), adds a learned position table of its own and runs pre-norm transformer
blocks whose attention stays inside each image block; between levels the **block aggregation** (sec. 3.2:
a 3x3 conv, LayerNorm over the channels, a 3x3 max-pool with stride 2) halves the map, so four neighbouring
blocks become one.  A final LayerNorm and the mean over the last map feed the classifier.

How the paper's parts map onto vitlab's:

* the image blocks are the ``window`` grouping with ``window_size = block_size`` and no shift: NesT's
  ``blockify`` (blocks in raster order, tokens in raster order inside a block) is Swin's window partition;
* "each block has its own position table" is one table over the level's map: NesT's ``(1, T, N, C)``
  table, ``T`` blocks of ``N`` tokens, is stored in raster order ``(1, H*W, C)`` as every staged position
  table of :class:`~vitlab.models.backbone.Stage` (:func:`blocks_to_raster` / :func:`raster_to_blocks` map
  between the two; :mod:`vitlab.interop.timm_nest` uses them), so the Backbone adds and resizes it;
* the block aggregation is the stage's downsampler, :class:`BlockAggregation` (the only NesT-specific part).

Parts, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: coordinates inside
each block) / ``mixer_kwargs`` (a linear-cost core such as ``focused_linear`` attends over the whole level, as FLatten
does in Swin; a non-attention mixer mixes over the map), ``norm`` (every LayerNorm), ``branch_scale`` (alias
``shortcut``) / ``shortcut_init``, ``featscale``, ``wiring``, ``init``.  ``pad_type="same"`` (the ``_jx`` models,
converted from the official JAX weights) pads the max-pool as TensorFlow's ``SAME`` (one row and column of ``-inf``
after the map) instead of one on each side.

State-dict keys: ``patch_embed.proj``, ``levels.{i}.downsample.{conv,norm}``, ``levels.{i}.pos_embed``
``(1, H*W, C)``, ``levels.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
``head``; timm's ``levels.{i}.pool``, ``levels.{i}.transformer_encoder`` and ``(1, T, N, C)`` tables are
mapped by :mod:`vitlab.interop.timm_nest`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import Mlp, MixerSpec, PatchEmbed, TokenLayout, create_norm, init_weights
from vitlab.layers.mixers import check_stage_kwargs
from vitlab.models.backbone import Backbone, Downsample, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.swin import check_stage_sizes

__all__ = ["Nest", "BlockAggregation", "nest_attention", "blocks_to_raster", "raster_to_blocks", "PAD_TYPES"]

PAD_TYPES = ("", "same")


def blocks_to_raster(table: torch.Tensor) -> torch.Tensor:
    """A per-block table ``(B, T, N, C)`` (``T`` square blocks in raster order, ``N`` tokens each in raster
    order: NesT's ``blockify`` layout) -> ``(B, H*W, C)`` in raster order over the whole map."""
    b, t, n, c = table.shape
    g, s = math.isqrt(t), math.isqrt(n)
    if g * g != t or s * s != n:
        raise ValueError(f"a NesT block table needs a square number of blocks and of tokens per block, got "
                         f"{t} blocks of {n} tokens (shape {tuple(table.shape)})")
    return table.reshape(b, g, g, s, s, c).transpose(2, 3).reshape(b, g * s * g * s, c)


def raster_to_blocks(table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of :func:`blocks_to_raster`: ``(B, H*W, C)`` on a square map -> ``(B, T, N, C)`` blocks of
    ``block_size`` tokens a side."""
    b, hw, c = table.shape
    side = math.isqrt(hw)
    if side * side != hw or side % block_size:
        raise ValueError(f"a square map of {hw} tokens cannot be cut into blocks of {block_size}x{block_size}")
    g = side // block_size
    x = table.reshape(b, g, block_size, g, block_size, c).transpose(2, 3)
    return x.reshape(b, g * g, block_size * block_size, c)


class BlockAggregation(Downsample):
    """NesT's block aggregation (Zhang et al., AAAI 2022, sec. 3.2): a 3x3 conv (stride 1, padding 1), a norm
    over the channels, then a 3x3 max-pool with stride 2 that halves the map.  ``pad_type=""`` pads the pool by
    one on every side (timm's default), ``"same"`` as TensorFlow's ``SAME`` (the official JAX code: the ``-inf``
    padding goes after the map).  Names are timm's ``ConvPool`` (``conv``, ``norm``, ``pool``)."""

    def __init__(self, in_chans: int, out_chans: int, norm: str = "layernorm", norm_eps: float = 1e-6,
                 pad_type: str = ""):
        super().__init__()
        if pad_type not in PAD_TYPES:
            raise ValueError(f"pad_type must be one of {PAD_TYPES} ('': symmetric, 'same': TensorFlow's SAME), "
                             f"got {pad_type!r}")
        self.pad_type = pad_type
        self.conv = nn.Conv2d(in_chans, out_chans, 3, padding=1)
        self.norm = create_norm(norm, out_chans, eps=norm_eps)
        self.pool = nn.MaxPool2d(3, stride=2, padding=0 if pad_type == "same" else 1)

    @staticmethod
    def same_padding(size: int, kernel: int = 3, stride: int = 2) -> Tuple[int, int]:
        """TensorFlow's ``SAME`` padding of one axis (before, after): the total a ``ceil(size / stride)`` output
        needs, the odd unit after."""
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def on_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, c, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        if self.pad_type == "same":  # -inf: a padded cell never wins the max
            x = F.pad(x, (*self.same_padding(w), *self.same_padding(h)), value=float("-inf"))
        return self.pool(x)


def nest_attention(spec: MixerSpec, block_size: int, **attention: Any) -> Dict[str, Any]:
    """What NesT asks of a level's attention (Zhang et al., 2022, sec. 3.1): attention inside each image block
    (the ``window`` grouping, no shift, no relative bias; the position table is the level's); a linear-cost
    core attends over the whole level; a non-attention mixer takes none of it."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    return dict(attention, grouping=("window", dict(window_size=block_size)))


def _per_level(value: Union[int, float, Sequence], n: int, what: str) -> Tuple:
    t = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(t) != n:
        raise ValueError(f"{what} needs {n} values (one per level), got {len(t)}: {t}")
    return t


class Nest(Backbone):
    """NesT (Zhang et al., AAAI 2022) whose parts are arguments; see the module docstring.  Sizes and keyword
    names are timm's ``Nest`` (``embed_dims``, ``num_heads``, ``depths``: an int or one value per level)."""

    stage_attr = "levels"
    features_fmt = "NCHW"  # timm's: the levels and forward_features give (B, C, H, W) maps

    def __init__(self, img_size: int = 224, in_chans: int = 3, patch_size: int = 4, num_levels: Optional[int] = None,
                 embed_dims: Sequence[int] = (128, 256, 512), num_heads: Sequence[int] = (4, 8, 16),
                 depths: Sequence[int] = (2, 2, 20), num_classes: int = 1000, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.5, pad_type: str = "",
                 global_pool: str = "avg", mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, shortcut: str = "plain",
                 branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: str = "trunc_normal", architecture: str = "nest",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"NesT pools the mean of its last map: global_pool must be 'avg', got {global_pool!r}")
        n = num_levels or next((len(v) for v in (depths, embed_dims, num_heads) if isinstance(v, (list, tuple))), 3)
        depths, dims, heads = (_per_level(v, n, w) for v, w in ((depths, "depths"), (embed_dims, "embed_dims"),
                                                                 (num_heads, "num_heads")))
        check_stage_sizes(depths, heads, min(dims), drop_path_rate)
        img = self._check_size(img_size, patch_size, n)
        self.num_classes, self.in_chans, self.img_size, self.num_levels = num_classes, in_chans, img, n
        self.num_features = self.embed_dim = dims[-1]
        self.depths, self.patch_size = depths, patch_size
        self.block_size = img // patch_size // 2 ** (n - 1)  # image blocks of every level: this many tokens a side
        self.patch_embed = PatchEmbed(img, patch_size, in_chans, dims[0])
        self.grid_size = self.patch_embed.grid_size
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        block_kw = dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                        branch_scale_init=shortcut_init, total_depth=sum(depths), featscale=featscale)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        self.levels = nn.Sequential(*self._build_levels(spec, dims, heads, mlp_ratio, attention, block_kw,
                                                        proj_drop_rate, drop_path_rate, pad_type))
        self.norm = create_norm(norm, dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        side = self.block_size
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans,
                                                           fixed_input_size=True, pool_size=(side, side))

    @staticmethod
    def _check_size(img_size: Union[int, Sequence[int]], patch_size: int, n: int) -> int:
        """The square image side; the patch map must split into ``4 ** (n - 1)`` equal square blocks."""
        if isinstance(img_size, (list, tuple)):
            if img_size[0] != img_size[1]:
                raise ValueError(f"NesT takes square images, got img_size={tuple(img_size)}")
            img_size = img_size[0]
        img = int(img_size)
        if patch_size < 1 or img % patch_size:
            raise ValueError(f"img_size {img} must be divisible by patch_size {patch_size}")
        side = img // patch_size
        if side % 2 ** (n - 1) or side == 0:
            raise ValueError(f"img_size {img} gives a {side}x{side} patch map, which {n} levels cannot cut into "
                             f"{4 ** (n - 1)} equal square blocks: {side} must be a positive multiple of "
                             f"{2 ** (n - 1)}")
        return img

    def _build_levels(self, spec: MixerSpec, dims, heads, mlp_ratio: float, attention: Dict[str, Any],
                      block_kw: Dict[str, Any], proj_drop: float, drop_path_rate: float, pad_type: str
                      ) -> List[Stage]:
        """Per level: the block aggregation (none before the first), the level's position table over its map,
        and the blocks attending inside the image blocks."""
        dpr = drop_path_rates(drop_path_rate, sum(self.depths))
        levels, asked, k = [], [], 0
        for i, depth in enumerate(self.depths):
            norm = (block_kw["norm"], block_kw["norm_eps"])
            down = BlockAggregation(dims[i - 1], dims[i], *norm, pad_type) if i else None
            side = self.block_size * 2 ** (self.num_levels - 1 - i)
            att = nest_attention(spec, self.block_size, **attention)
            asked.append((spec, (), att))
            blocks = [Block(dims[i], spec.build(dims[i], heads[i], TokenLayout((side, side)), lenient=True, **att),
                            Mlp(dims[i], int(dims[i] * mlp_ratio), drop=proj_drop), drop_path=dpr[k + j], **block_kw)
                      for j in range(depth)]
            k += depth
            levels.append(Stage(blocks, dims[i], self.patch_size * 2 ** i, (side, side), downsample=down,
                                pos_tokens=side * side))
        check_stage_kwargs(spec.kwargs, asked)
        return levels

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        # the official init: truncated N(0, 0.02) for convs and position tables, then the named Linear init
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-0.04, b=0.04)
        init_weights(self, init)


# -- registered recipes (timm's names; sizes of the official code's nest_{tiny,small,base}_s196_224 configs) --------
# drop path: the official configs' stochastic_depth_drop (timm's constructor default is 0.5 for every size)
_SIZES = {
    "tiny": dict(embed_dims=(96, 192, 384), num_heads=(3, 6, 12), depths=(2, 2, 8), drop_path_rate=0.2),
    "small": dict(embed_dims=(96, 192, 384), num_heads=(3, 6, 12), depths=(2, 2, 20), drop_path_rate=0.3),
    "base": dict(embed_dims=(128, 256, 512), num_heads=(4, 8, 16), depths=(2, 2, 20), drop_path_rate=0.5),
}

for _size, _cfg in _SIZES.items():
    register_recipe(Nest, f"nest_{_size}", _cfg, f"NesT-{_size[0].upper()} (Zhang et al., AAAI 2022), timm's sizes.",
                    fixed_input_size=True)
    # the official JAX weights were trained with TensorFlow's SAME padding in the block aggregation's max-pool
    register_recipe(Nest, f"nest_{_size}_jx", dict(_cfg, pad_type="same"),
                    f"NesT-{_size[0].upper()} (Zhang et al., AAAI 2022) with the official JAX code's SAME padding.",
                    fixed_input_size=True)
