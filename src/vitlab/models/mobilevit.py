"""MobileViT, built from vitlab parts.

"MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer" (Mehta and Rastegari,
ICLR 2022).  A 3x3 stride-2 conv stem, then five stages of MobileNetV2 inverted residuals ("MV2", Sandler et
al., CVPR 2018; the first of each stage strides); stages 3-5 end with a **MobileViT block** (sec. 3.1,
Fig. 1b): a 3x3 conv and a 1x1 conv to the transformer width ``d``, ``L`` transformer blocks over the map
*unfolded* into ``ph x pw`` patches (attention among the pixels at the same position of every patch: the
``unfold`` grouping of :mod:`vitlab.layers.unfold`), a LayerNorm, fold back, a 1x1 conv to the block width,
concatenation with the block's input and a 3x3 fusion conv.  A 1x1 conv to ``num_features`` (``final_conv``)
closes the last stage; average pooling and a Linear classify.  A map that is not a multiple of the patch is
resized bilinearly around the transformer (as the official code and timm).

The transformer blocks are the one :class:`~vitlab.models.block.Block` (SiLU MLP of ratio 2, 4 heads,
LayerNorm eps 1e-5), so the part options apply to them: ``mixer=``, ``core=``, ``modifiers=`` (attention
inside the unfolded groups; a linear-cost core attends over the whole map, FLatten's rule; a non-attention
mixer mixes the whole map), ``norm=`` (every LayerNorm, the block's closing norm included),
``branch_scale=``/``shortcut=`` with ``shortcut_init=``, ``featscale=``, ``wiring=``, ``mixer_kwargs=``,
``attn_position=`` (e.g. ``("rope",)``: a token's coordinates are its patch's position on the patch grid).
Convolutions keep their BatchNorm.

State-dict keys are timm's ``mobilevit_*`` (``timm.models.byobnet.ByobNet``) under vitlab's stage layout:
timm's ``stem``, ``stages.{i}.0`` (each stage's first, strided block), ``stages.{i}.{j}`` (j > 0) and
``head.fc`` are ``patch_embed``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j-1}`` and ``head`` here
(:mod:`vitlab.interop.timm_mobilevit`); every name inside a block is timm's.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import DropPath, Mlp, MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.layers.inplace import conv_bn_act
from vitlab.layers.unfold import patch_pair
from vitlab.models.backbone import Backbone, Downsample, Stage
from vitlab.models.base import Intermediate, make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["ConvNormAct", "InvertedResidual", "MobileViTBlock", "MobileViT", "mobilevit_attention", "make_divisible"]


def make_divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to a multiple of ``divisor``, never below 90 % of ``v`` (MobileNetV2's rule, as timm)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvNormAct(nn.Module):
    """``k x k`` conv (no bias, padding ``k // 2``) -> BatchNorm -> SiLU (``act=False``: none); on a
    ``(B, C, H, W)`` map.  Names ``conv``, ``bn`` as timm's ``ConvNormAct``."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, fm: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(self.conv, self.bn, self.act, fm)  # without autograd: BN folded, act in place


class ConvStem(Downsample, ConvNormAct):
    """The stem: one 3x3 stride-2 :class:`ConvNormAct` (sec. 4.1), image -> ``(tokens, hw)``."""

    on_map = ConvNormAct.forward


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual ("MV2"; Sandler et al., CVPR 2018, as MobileViT's sec. 3.1 uses it):
    1x1 expansion -> 3x3 depthwise (stride) -> 1x1 linear projection, plus the input when the shapes allow.
    Called on tokens ``(x, layout)``; names as timm's ``BottleneckBlock`` (``conv1_1x1``, ``conv2_kxk``,
    ``conv3_1x1``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        mid = make_divisible(in_chs * expansion)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride=stride, groups=mid)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act=False)
        self.residual = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.residual else nn.Identity()

    def on_map(self, fm: torch.Tensor) -> torch.Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(fm)))
        return fm + self.drop_path(y) if self.residual else y

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return layout.from_map(self.on_map(layout.to_map(x)))


class EntryInvertedResidual(Downsample, InvertedResidual):
    """A stage's first MV2 block (it strides and changes the width): the stage's downsampler."""

    on_map = InvertedResidual.on_map


def mobilevit_attention(spec: MixerSpec, patch: Tuple[int, int], **attention: Any) -> Dict[str, Any]:
    """What MobileViT asks of attention: the pixels at one position of every patch attend to each other
    (sec. 3.1); a linear-cost core attends over the whole map instead (FLatten's rule, Han et al., ICCV 2023);
    a non-attention mixer takes none of the attention parts."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    return dict(attention, grouping=("unfold", dict(patch_size=patch)))


class MobileViTBlock(nn.Module):
    """The MobileViT block (Mehta and Rastegari, ICLR 2022, sec. 3.1, Fig. 1b); see the module docstring.
    ``blocks`` are the transformer's :class:`Block` s of width ``dim``, ``patch`` the unfolding patch."""

    def __init__(self, chs: int, dim: int, blocks: Sequence[Block], patch: Tuple[int, int], norm: str = "layernorm",
                 norm_eps: float = 1e-5):
        super().__init__()
        self.patch_size = patch
        self.conv_kxk = ConvNormAct(chs, chs, 3)
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.ModuleList(blocks)
        self.norm = create_norm(norm, dim, eps=norm_eps)
        self.conv_proj = ConvNormAct(dim, chs, 1)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3)

    def _global(self, fm: torch.Tensor, out: Optional[list] = None) -> torch.Tensor:
        """The transformer on the unfolded map (resized to a multiple of the patch and back if needed);
        ``out`` collects ``(name, kind, map)`` of every half block (:meth:`MobileViT.forward_halves`)."""
        h, w = fm.shape[-2:]
        size = tuple(math.ceil(s / p) * p for s, p in zip((h, w), self.patch_size))
        if size != (h, w):  # the official code resizes instead of padding (no mask in attention)
            fm = F.interpolate(fm, size=size, mode="bilinear", align_corners=False)
        layout = TokenLayout(size)
        x = layout.from_map(fm)
        for k, blk in enumerate(self.transformer):
            if out is None:
                x = blk(x, layout)
                continue
            x = blk.attn_half(x, layout)
            out.append((f"transformer.{k}.attn", "attn", layout.to_map(x)))
            x = blk.mlp_half(x, layout)
            out.append((f"transformer.{k}.mlp", "mlp", layout.to_map(x)))
        fm = layout.to_map(self.norm(x))
        return F.interpolate(fm, size=(h, w), mode="bilinear", align_corners=False) if size != (h, w) else fm

    def forward(self, x: torch.Tensor, layout: TokenLayout, out: Optional[list] = None) -> torch.Tensor:
        fm = layout.to_map(x)
        y = self.conv_proj(self._global(self.conv_1x1(self.conv_kxk(fm)), out))
        return layout.from_map(self.conv_fusion(torch.cat([fm, y], dim=1)))


def _halve(hw: Tuple[int, int], stride: int) -> Tuple[int, int]:
    return tuple((s - 1) // stride + 1 for s in hw)  # type: ignore[return-value]


def _check_sizes(channels, depths, dims, tdepths) -> None:
    n = len(channels)
    if n < 1 or not len(depths) == len(dims) == len(tdepths) == n:
        raise ValueError(f"channels, depths, transformer_dims and transformer_depths need one value per stage; got "
                         f"{len(channels)}, {len(depths)}, {len(dims)}, {len(tdepths)} values")
    if any(c < 1 for c in channels) or any(d < 1 for d in depths) or any(t < 0 for t in tdepths):
        raise ValueError(f"channels and depths must be positive and transformer_depths >= 0, got channels="
                         f"{tuple(channels)}, depths={tuple(depths)}, transformer_depths={tuple(tdepths)}")
    bad = [i for i, (d, t) in enumerate(zip(dims, tdepths)) if t and d < 1]
    if bad:
        raise ValueError(f"stage(s) {bad} have transformer blocks but no transformer_dims; got {tuple(dims)}")


class MobileViT(Backbone):
    """MobileViT (Mehta and Rastegari, ICLR 2022) whose parts are arguments; see the module docstring.

    Sizes per stage: ``channels`` (block width), ``depths`` (MV2 blocks, the first strides by ``strides``),
    ``transformer_dims`` and ``transformer_depths`` (0: no MobileViT block); ``expansion`` (MV2), ``stem_chs``,
    ``num_features`` (the final 1x1 conv; 0: none), ``patch_size``, ``num_heads``, ``mlp_ratio``.
    """

    features_fmt = "NCHW"  # timm's: (B, C, H, W) maps from every stage and from forward_features

    def __init__(self, img_size: int = 256, in_chans: int = 3, num_classes: int = 1000, stem_chs: int = 16,
                 channels: Sequence[int] = (16, 24, 48, 64, 80), depths: Sequence[int] = (1, 3, 1, 1, 1),
                 strides: Sequence[int] = (1, 2, 2, 2, 2), expansion: float = 2.0,
                 transformer_dims: Sequence[int] = (0, 0, 64, 80, 96), transformer_depths: Sequence[int] = (0, 0, 2, 4, 3),
                 patch_size: int = 2, num_heads: int = 4, mlp_ratio: float = 2.0, num_features: int = 320,
                 qkv_bias: bool = True, mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 norm: str = "layernorm", norm_eps: float = 1e-5,
                 shortcut: str = "plain", shortcut_init: Optional[float] = None, branch_scale: Optional[str] = None,
                 featscale: bool = False, wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, architecture: str = "mobilevit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        channels, depths, strides = tuple(channels), tuple(depths), tuple(strides)
        _check_sizes(channels, depths, tuple(transformer_dims), tuple(transformer_depths))
        if len(strides) != len(channels) or any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides needs one value of 1 or 2 per stage, got {strides}")
        img = img_size if isinstance(img_size, int) else img_size[0]
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.patch_embed = ConvStem(in_chans, stem_chs, 3, stride=2)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        units = sum(depths) + sum(1 for t in transformer_depths if t)
        block_kw = dict(spec=spec, patch=patch_pair(patch_size), num_heads=num_heads, mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias, norm=norm, norm_eps=norm_eps, branch_scale=branch_scale or shortcut,
                        branch_scale_init=shortcut_init, featscale=featscale, wiring=wiring, drop=drop_rate,
                        attn_drop=attn_drop_rate, total_depth=max(sum(transformer_depths), 1))
        dpr, hw, reduction, prev, stages = drop_path_rates(drop_path_rate, units), _halve((img, img), 2), 2, stem_chs, []
        for i, chs in enumerate(channels):
            hw, reduction = _halve(hw, strides[i]), reduction * strides[i]
            n = depths[i] + (1 if transformer_depths[i] else 0)  # MV2 blocks, then the MobileViT block
            rates, dpr = dpr[:n], dpr[n:]
            stages.append(self._stage(prev, chs, depths[i], strides[i], expansion, transformer_dims[i],
                                      transformer_depths[i], hw, reduction, rates, block_kw))
            prev = chs
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(prev, num_features, 1) if num_features else None
        self.num_features = self.embed_dim = num_features or prev
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.9)

    @staticmethod
    def _stage(prev: int, chs: int, depth: int, stride: int, expansion: float, dim: int, tdepth: int,
               hw: Tuple[int, int], reduction: int, rates: List[float], block_kw: Dict[str, Any]) -> Stage:
        """One stage: its first MV2 block (the downsampler), ``depth - 1`` more, then a MobileViT block of
        ``tdepth`` transformer blocks of width ``dim`` (none when ``tdepth == 0``)."""
        down = EntryInvertedResidual(prev, chs, stride, expansion, rates[0])
        blocks: List[nn.Module] = [InvertedResidual(chs, chs, 1, expansion, rates[j]) for j in range(1, depth)]
        if tdepth:
            blocks.append(_mobilevit_block(chs, dim, tdepth, hw, rates[-1], **block_kw))
        return Stage(blocks, chs, reduction, hw, downsample=down)

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        init_weights(self, init, conv_fan_out=True)  # the official code's fan-out conv init

    # -- the contract: the last stage's tap includes final_conv (timm's) -------------------------------
    def _feature_unit(self, i: int, unit: Any, x: torch.Tensor, layout: TokenLayout):
        x, layout = super()._feature_unit(i, unit, x, layout)
        if i == len(self.stages) - 1 and self.final_conv is not None:
            x = layout.from_map(self.final_conv(layout.to_map(x)))
        return x, layout

    def _feature_info(self) -> List[Dict[str, Any]]:
        info = super()._feature_info()
        if self.final_conv is not None:
            info[-1] = dict(info[-1], num_chs=self.num_features, module="final_conv")
        return info

    def _truncate_units(self, n: int) -> None:
        if n < len(self.stages):  # final_conv belongs to the last stage's tap
            self.final_conv = None
        super()._truncate_units(n)

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """The stem (``embed``), per stage its first MV2 block (``downsample``), the other MV2 blocks
        (``conv``), the attention and MLP halves of every transformer block inside a MobileViT block (maps of
        the transformer width, at the unfolded map's size) and the block's output (``block``); ``final_conv``."""
        x, layout = self.forward_stem(x)
        out = [self._entry("patch_embed", "embed", x, layout, 0)]
        for i, (name, prefix, stage) in enumerate(self.named_stages()):
            x, layout = self._enter(i, stage, x, layout, out, name)
            for j, blk in enumerate(stage.blocks):
                if isinstance(blk, MobileViTBlock):
                    inner: list = []
                    x = blk(x, layout, inner)
                    out += [Intermediate(f"{prefix}.{j}.{n}", kind, fm, None, i) for n, kind, fm in inner]
                    out.append(self._entry(f"{prefix}.{j}", "block", x, layout, i))
                else:
                    x = blk(x, layout)
                    out.append(self._entry(f"{prefix}.{j}", "conv", x, layout, i))
            if i == len(self.stages) - 1 and self.final_conv is not None:
                x = layout.from_map(self.final_conv(layout.to_map(x)))
                out.append(self._entry("final_conv", "conv", x, layout, i))
        return out

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem; one group per stage (coarse) or per block, each stage's first block
        (``downsample``) before its others (fine); ``final_conv`` last."""
        blocks = [(r"^stages\.(\d+)", None)] if coarse else [(r"^stages\.(\d+)\.downsample", (-1,)),
                                                             (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        return dict(stem=r"^patch_embed", blocks=blocks + [(r"^final_conv", (99999,))])


def _mobilevit_block(chs: int, dim: int, depth: int, hw: Tuple[int, int], drop_path: float, spec: MixerSpec,
                     patch: Tuple[int, int], num_heads: int, mlp_ratio: float, qkv_bias: bool, norm: str,
                     norm_eps: float, drop: float, attn_drop: float, **block_kw: Any) -> MobileViTBlock:
    """A MobileViT block whose ``depth`` transformer blocks are vitlab :class:`Block` s with SiLU MLPs."""
    layout = TokenLayout(tuple(math.ceil(s / p) * p for s, p in zip(hw, patch)))  # the unfolded map at img_size
    att = mobilevit_attention(spec, patch, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
    blocks = [Block(dim, spec.build(dim, num_heads, layout, **att),
                    Mlp(dim, int(dim * mlp_ratio), act_layer=nn.SiLU, drop=drop), norm=norm, norm_eps=norm_eps,
                    drop_path=drop_path, **block_kw) for _ in range(depth)]
    return MobileViTBlock(chs, dim, blocks, patch, norm, norm_eps)


# -- registered recipes (the paper's Table 4 / official configs; timm's names) --------------------------
_SIZES = {
    "xxs": dict(channels=(16, 24, 48, 64, 80), expansion=2.0, transformer_dims=(0, 0, 64, 80, 96), num_features=320),
    "xs": dict(channels=(32, 48, 64, 80, 96), expansion=4.0, transformer_dims=(0, 0, 96, 120, 144), num_features=384),
    "s": dict(channels=(32, 64, 96, 128, 160), expansion=4.0, transformer_dims=(0, 0, 144, 192, 240),
              num_features=640),
}

for _size, _cfg in _SIZES.items():
    register_recipe(MobileViT, f"mobilevit_{_size}", _cfg,
                    f"MobileViT-{_size.upper()} (Mehta and Rastegari, ICLR 2022), timm's sizes.",
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=0.9)
