"""RegionViT, built from vitlab parts.

"RegionViT: Regional-to-Local Attention for Vision Transformers" (Chen, Panda & Fan, ICLR 2022).  Two token
streams: *local* tokens from a stride-4 stem (three 3x3 convs for Tiny/Small, one 8x8 stride-4 conv for
Medium/Base; sec. 3.1) and *regional* tokens from a ``4 * window`` patchify conv of the image, one per region of
``window x window`` local tokens.  Each block (sec. 3.2) runs

    regional self-attention (RSA)   r = r + DropPath(ls0(attn(norm0(r))))          over all regional tokens
    local self-attention (LSA)      each regional token with its window:  x + DropPath(ls1(attn(norm1(x))))
    MLP                             on both streams                       x + DropPath(ls2(mlp(norm2(x))))

with one attention module (shared weights, a relative position bias inside each window for LSA only).  Between
stages both streams go through one downsampler (LayerNorm, GELU, a 3x3 stride-2 depthwise conv doubling the
channels), so every region keeps a ``window x window`` window.  The classifier averages the normalised regional
tokens of the last stage.

In vitlab the two streams travel as one sequence, the regional tokens as its prefix
(``TokenLayout(local grid, num_prefix=regions)``): the :class:`~vitlab.models.backbone.Backbone` runs the stages,
``forward_intermediates`` gives the local maps (the official detection features) and ``forward_halves`` keeps the
regional tokens as the prefix.  The attention is any vitlab mixer in the ``regional`` grouping
(:mod:`vitlab.layers.regional`); :class:`RegionalBlock` is the one :class:`~vitlab.models.block.Block` plus the
RSA step.  Parts as in every family: ``mixer``, ``core``, ``modifiers``, ``attn_position`` (``("rope",)``: coordinates
inside each region's window, regional tokens on the region grid), ``mixer_kwargs``, ``norm`` (every LayerNorm, the
stem's and downsamplers' too), ``branch_scale`` / ``shortcut_init``, ``featscale``, ``wiring``, ``init``.  A core
without a logit bias (``focused_linear``, ``cross_covariance``) is refused by the capability check: the windows carry a
relative position bias.

Sizes are the official code's (IBM/RegionViT ``_model_cfg``).  Any image size runs as in the official code (the
``1conv`` stem needs sides of at least 2 pixels): where a side is not a multiple of ``4 * window``, the image is
zero-padded around its centre to whole regions before the regional conv (a side that fits then gains a whole
region too, as the official code pads both sides when either misfits), and in every stage whose local map is not
``window`` times the regional grid the local map is zero-padded at the bottom and right, the padded tokens kept
through the stage's blocks behind the official per-window LSA masks (:func:`~vitlab.layers.regional.padding_keep`)
and dropped before the next downsampler.  Sides that fit (multiples of ``4 * window * 2**(stages - 1)``, 224 at the
paper's sizes) take the unpadded path.  ``forward_intermediates`` and ``forward_halves`` give the unpadded local
maps; at a padded size ``forward_features`` keeps the last stage's padded local tokens.  State-dict keys follow the
official code inside the blocks (``norm0, norm1, attn.{qkv, proj, rel_pos}, norm2, mlp.{fc1, fc2}``); the stem is
``patch_embed.proj``, the regional embedding ``region_embed`` (``cls_token`` there), stage ``i`` is
``layers.{i}.{downsample.proj, blocks.{j}}`` (``layers.{i}.block.{0, j+1}`` there).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import DropPath, Mlp, MixerSpec, TokenLayout, create_norm, create_shortcut, init_weights
from vitlab.layers.regional import join_streams, local_map, regional_grid
from vitlab.models.backbone import Backbone, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.swin import check_stage_sizes

__all__ = ["RegionViT", "RegionalBlock", "RegionalDownsample", "MapNorm", "STEMS", "pad_to_regions", "stage_grids"]

STEMS = ("3conv", "1conv")


def pad_to_regions(x: torch.Tensor, region: int) -> torch.Tensor:
    """The image the regional conv reads (the official ``PatchEmbed(extra_padding=True)``): where a side is not a
    multiple of ``region``, *both* sides are zero-padded by ``region - side % region`` split around the centre
    (left / top the smaller half), so a side that fits gains a whole region."""
    h, w = x.shape[-2:]
    if not (h % region or w % region):
        return x
    ph, pw = region - h % region, region - w % region
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def stage_grids(h: int, w: int, stem: str, window: int, stages: int) -> List[Tuple[Tuple[int, int], int]]:
    """Per stage, the local map ``(h, w)`` and the number of regions of an ``h x w`` image (official geometry:
    the stride-4 stem, :func:`pad_to_regions`, then stride-2 convs with padding 1 on both maps)."""
    side = (lambda s: (s - 2) // 4 + 1) if stem == "1conv" else (lambda s: ((s + 1) // 2 + 1) // 2)
    region, fits = 4 * window, not (h % (4 * window) or w % (4 * window))
    local = (side(h), side(w))
    regions = (h // region + (not fits), w // region + (not fits))
    out = [(local, regions[0] * regions[1])]
    for _ in range(stages - 1):
        local, regions = tuple((s + 1) // 2 for s in local), tuple((r + 1) // 2 for r in regions)
        out.append((local, regions[0] * regions[1]))
    return out


class MapNorm(nn.Module):
    """A token norm (any :data:`~vitlab.layers.NORMS` name) over the channels of a ``(B, C, H, W)`` map: the
    official code's ``LayerNorm2d`` (eps 1e-5)."""

    def __init__(self, norm: str, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = create_norm(norm, dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def local_stem(kind: str, in_chans: int, dim: int, norm: str) -> nn.Sequential:
    """The local tokens' stride-4 stem (Chen et al., 2022, sec. 3.1): ``3conv`` = 3x3/2 conv, norm, GELU, 3x3/2
    conv, norm, GELU, 3x3/1 conv (widths C/4, C/2, C); ``1conv`` = one 8x8 conv, stride 4, padding 3."""
    if kind == "1conv":
        return nn.Sequential(nn.Conv2d(in_chans, dim, 8, stride=4, padding=3))
    if kind != "3conv":
        raise ValueError(f"stem must be one of {STEMS}, got {kind!r}")
    if dim % 4:
        raise ValueError(f"the 3conv stem needs embed_dims[0] divisible by 4, got {dim}")
    return nn.Sequential(nn.Conv2d(in_chans, dim // 4, 3, stride=2, padding=1), MapNorm(norm, dim // 4), nn.GELU(),
                         nn.Conv2d(dim // 4, dim // 2, 3, stride=2, padding=1), MapNorm(norm, dim // 2), nn.GELU(),
                         nn.Conv2d(dim // 2, dim, 3, stride=1, padding=1))


class RegionalDownsample(nn.Module):
    """Both streams through one norm, GELU and 3x3 stride-2 depthwise conv (``in_dim -> out_dim``, groups
    ``in_dim``; the official ``Projection``, shared by regional and local tokens).  Returns the tokens and their
    new :class:`TokenLayout` (a quarter of the regions)."""

    takes_prefix = True

    def __init__(self, in_dim: int, out_dim: int, window_size: int, norm: str = "layernorm"):
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"the depthwise downsampler needs out_dim divisible by in_dim, got {in_dim} -> {out_dim}")
        self.window_size = window_size
        self.proj = nn.Sequential(MapNorm(norm, in_dim), nn.GELU(),
                                  nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, groups=in_dim))

    def forward(self, x: torch.Tensor, layout: TokenLayout):
        p = layout.num_prefix
        rgrid = regional_grid(layout, self.window_size)
        r = self.proj(x[:, :p].transpose(1, 2).reshape(x.shape[0], -1, *rgrid))
        return join_streams(r, self.proj(local_map(x, layout)), self.window_size)  # the last stage's padding dropped


class RegionalBlock(Block):
    """The one :class:`Block` (LSA + MLP on both streams) after RegionViT's regional self-attention (Chen et al.,
    2022, sec. 3.2), which reuses the block's attention ``attn`` on the regional tokens with its own norm
    ``norm0``, branch scale ``ls0`` and drop path; the RSA half follows the block's wiring (pre: norm before;
    post/end: after, ``end`` without a norm; res_post: on the branch output)."""

    def __init__(self, dim: int, mixer: nn.Module, mlp: nn.Module, window_size: int, **block: Any):
        super().__init__(dim, mixer, mlp, **block)
        self.window_size = window_size
        norm, eps = block.get("norm", "layernorm"), block.get("norm_eps", 1e-6)
        self.norm0 = create_norm(norm, dim, eps=eps) if self.wiring != "end" else nn.Identity()
        self.ls0 = create_shortcut(block.get("branch_scale", "plain"), dim, block.get("branch_scale_init"),
                                   depth=block.get("total_depth", 1))
        self.drop_path0 = DropPath(block["drop_path"]) if block.get("drop_path", 0) > 0 else nn.Identity()

    def regional_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The RSA step on the regional tokens (the prefix of ``x``); local tokens unchanged."""
        p = layout.num_prefix
        r, regions = x[:, :p], TokenLayout(regional_grid(layout, self.window_size))
        if self.post_norm:
            r = self.norm0(r + self.drop_path0(self.ls0(self.attn(r, regions))))
        elif self.wiring == "res_post":  # Swin V2's residual post-norm: the branch output is normalised
            r = r + self.drop_path0(self.ls0(self.norm0(self.attn(r, regions))))
        else:
            r = r + self.drop_path0(self.ls0(self.attn(self.norm0(r), regions)))
        return torch.cat([r, x[:, p:]], dim=1)

    def attn_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return super().attn_half(self.regional_half(x, layout), layout)


class RegionViT(Backbone):
    """RegionViT (Chen et al., ICLR 2022) whose parts are arguments; see the module docstring.

    Sizes: ``embed_dims``, ``depths``, ``num_heads`` (one per stage), ``window_size`` (local tokens per region
    side, every stage), ``mlp_ratio``, ``stem`` (``3conv`` | ``1conv``).  Any input size runs, padded as the
    official code where it does not fit whole windows (see the module docstring; ``img_size`` sets ``default_cfg``).
    """

    stage_attr = "layers"
    features_fmt = "NLC"  # regional tokens (prefix) then local tokens; forward_head averages the regional ones

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 8, 2),
                 num_heads: Sequence[int] = (2, 4, 8, 16), window_size: int = 7, mlp_ratio: float = 4.0,
                 stem: str = "3conv", qkv_bias: bool = True, mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, branch_scale: Optional[str] = None,
                 shortcut: str = "plain", shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, architecture: str = "regionvit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        dims, depths, num_heads = tuple(embed_dims), tuple(depths), tuple(num_heads)
        check_stage_sizes(depths, num_heads, dims[0], drop_path_rate)
        if len(dims) != len(depths) or window_size < 1:
            raise ValueError(f"embed_dims {dims} needs one width per stage ({len(depths)} stages) and window_size "
                             f">= 1 (got {window_size})")
        self.num_classes, self.in_chans, self.window_size, self.stem = num_classes, in_chans, window_size, stem
        self.img_size = img_size if isinstance(img_size, int) else img_size[0]
        self._check_side(self.img_size, self.img_size)
        self.embed_dim, self.num_features = dims[0], dims[-1]
        self.patch_embed = local_stem(stem, in_chans, dims[0], norm)
        self.region_embed = nn.Conv2d(in_chans, dims[0], 4 * window_size, stride=4 * window_size)
        self.pos_drop = nn.Dropout(drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        block = dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                     branch_scale_init=shortcut_init, total_depth=sum(depths), featscale=featscale)
        attention = dict(grouping=("regional", dict(window_size=window_size)), position=("regional_relative",),
                         qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        dpr, k, stages = drop_path_rates(drop_path_rate, sum(depths)), 0, []
        grids = stage_grids(self.img_size, self.img_size, stem, window_size, len(depths))
        for i, (depth, (hw, regions)) in enumerate(zip(depths, grids)):
            down = RegionalDownsample(dims[i - 1], dims[i], window_size, norm) if i else None
            side = math.isqrt(regions) * window_size  # the local map padded to whole windows
            layout = TokenLayout((side, side), regions)
            blocks = [RegionalBlock(dims[i], spec.build(dims[i], num_heads[i], layout, **attention),
                                    Mlp(dims[i], int(dims[i] * mlp_ratio), drop=drop_rate), window_size,
                                    drop_path=dpr[k + j], **block) for j in range(depth)]
            stages.append(Stage(blocks, dims[i], 4 * 2 ** i, hw, downsample=down))
            k += depth
        self.layers = nn.ModuleList(stages)
        self.norm = create_norm(norm, dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.img_size, num_classes, in_chans)

    def _check_side(self, h: int, w: int) -> None:
        if self.stem == "1conv" and min(h, w) < 2:  # the 8x8 conv (stride 4, padding 3) gives no token
            raise ValueError(f"RegionViT's 1conv stem needs image sides of at least 2 pixels, got {h}x{w}")

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        self._check_side(x.shape[-2], x.shape[-1])

    def forward_stem(self, x: torch.Tensor):
        """Image -> regional tokens then local tokens ``(B, R + H*W, C)`` and ``TokenLayout((H, W), R)``."""
        self.check_input(x)
        local = self.pos_drop(self.patch_embed(x))  # the official dropout reads the local tokens only
        return join_streams(self.region_embed(pad_to_regions(x, 4 * self.window_size)), local, self.window_size)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the regional tokens: ``R`` of the ``R * (1 + window**2)`` tokens (the local map holds whole
        windows, padded where the image does not fit)."""
        return x[:, :x.shape[1] // (1 + self.window_size ** 2)].mean(dim=1)

    @staticmethod
    def _unpadded(x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        """Regional tokens and the local tokens without a stage's padding, and their layout (for the taps)."""
        if not any(getattr(layout, "pad", (0, 0))):
            return x, layout
        fm = local_map(x, layout)
        return torch.cat([x[:, :layout.num_prefix], fm.flatten(2).transpose(1, 2)], 1), TokenLayout(
            fm.shape[-2:], layout.num_prefix)

    def _format(self, x: torch.Tensor, layout: Optional[TokenLayout], output_fmt: str) -> torch.Tensor:
        return super()._format(*self._unpadded(x, layout), output_fmt)

    def _entry(self, name: str, kind: str, x: torch.Tensor, layout: TokenLayout, stage: int):
        return super()._entry(name, kind, *self._unpadded(x, layout), stage)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return {**super().group_matcher(coarse), "stem": r"^patch_embed|^region_embed"}


# -- registered recipes: the official code's sizes (IBM/RegionViT, regionvit.py ``_model_cfg``) ----------------
_SIZES = {
    "tiny": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(2, 4, 8, 16), stem="3conv"),
    "small": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), num_heads=(3, 6, 12, 24), stem="3conv"),
    "medium": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 14, 2), num_heads=(3, 6, 12, 24), stem="1conv"),
    "base": dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 14, 2), num_heads=(4, 8, 16, 32), stem="1conv"),
}
for _size, _cfg in _SIZES.items():
    register_recipe(RegionViT, f"regionvit_{_size}", _cfg,
                    f"RegionViT-{_size[0].upper()} (Chen et al., ICLR 2022, Table 1): the official code's sizes.")
