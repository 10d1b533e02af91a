"""MaxViT, built from vitlab parts.

"MaxViT: Multi-Axis Vision Transformer" (Tu, Talebi, Zhang, Yang, Milanfar, Bovik & Li, ECCV 2022).  A conv
stem (3x3 stride-2 conv, BatchNorm + GELU, 3x3 conv; sec. 3.3), then four stages of **MaxViT blocks**
(sec. 3.2-3.3, Fig. 2): an MBConv with squeeze-excitation (:class:`~vitlab.layers.mbconv.MBConv`; the
first of each stage strides by 2), then *block attention* (non-overlapping ``P x P`` windows: the ``window``
grouping) and *grid attention* (a ``G x G`` grid dilated over the map: the ``grid`` grouping of
:mod:`vitlab.layers.grid`), each a pre-norm transformer block (the one :class:`~vitlab.models.block.Block`)
with a relative position bias per group (``relative``) and heads of 32 channels.  The classifier averages the
last map, normalises it, applies a Linear + tanh pre-logits layer (the official code's ``representation_size``;
timm's ``NormMlpClassifierHead``) and the class Linear.  The official TensorFlow models use TF's SAME padding,
tanh-approximated GELU and BatchNorm eps 1e-3 (timm's ``maxvit_*_tf`` configs), as here.

Parts as every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: coordinates inside each
window and grid group) / ``mixer_kwargs`` (the attention of both sub-blocks; a linear-cost core attends over the whole
map, FLatten's rule (Han et al., ICCV 2023); a non-attention mixer mixes the whole map), ``norm`` (every LayerNorm, the
head's included; the convs keep their BatchNorm), ``branch_scale`` / ``shortcut`` with ``shortcut_init``, ``featscale``,
``wiring``, ``init``.

State-dict keys are timm's ``maxvit_*_tf_*`` (``timm.models.maxxvit.MaxxVit``) under vitlab's stage layout:
timm's ``stem``, ``stages.{i}.blocks.0.conv`` (each stage's strided MBConv) and ``head.{norm, pre_logits.fc,
fc}`` are ``patch_embed``, ``stages.{i}.downsample`` and ``fc_norm.{norm, fc}``, ``head`` here; the relative
tables are stored ``((2P-1)^2, heads)`` as Swin's (timm's TF layout ``(heads, 2P-1, 2P-1)`` indexes the
opposite offset): :mod:`vitlab.interop.timm_maxvit` converts both.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.layers.mbconv import BatchNormAct2d, MBConv, SameConv2d
from vitlab.layers.mixers import check_stage_kwargs
from vitlab.models.backbone import Backbone, Downsample, Stage
from vitlab.models.base import Intermediate, make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["MaxViT", "MaxViTBlock", "MaxViTStem", "PreLogits", "maxvit_attention"]


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")  # the official TensorFlow code's approximate GELU


class MaxViTStem(Downsample):
    """The stem (sec. 3.3): ``conv1`` 3x3 stride 2, ``norm1`` (BatchNorm + GELU), ``conv2`` 3x3, both convs
    with TF SAME padding; image -> ``(tokens, hw)``.  Names as timm's ``maxxvit.Stem``."""

    def __init__(self, in_chans: int, out_chs: int, bias: bool = True, eps: float = 1e-3):
        super().__init__()
        self.conv1 = SameConv2d(in_chans, out_chs, 3, stride=2, bias=bias)
        self.norm1 = BatchNormAct2d(out_chs, eps, _gelu_tanh())
        self.conv2 = SameConv2d(out_chs, out_chs, 3, bias=bias)

    def on_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


class MBConvDownsample(Downsample, MBConv):
    """A stage's first, strided MBConv: the stage's downsampler (tokens in, ``(tokens, hw)`` out)."""

    on_map = MBConv.forward


class MaxViTBlock(nn.Module):
    """One MaxViT block (Fig. 2): ``conv`` (MBConv; none in a stage's first block, whose MBConv is the stage's
    downsampler), then ``attn_block`` and ``attn_grid``, two :class:`Block` s; on tokens ``(x, layout)``."""

    def __init__(self, attn_block: Block, attn_grid: Block, conv: Optional[MBConv] = None):
        super().__init__()
        self.conv = conv
        self.attn_block, self.attn_grid = attn_block, attn_grid

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.conv is not None:
            x = layout.from_map(self.conv(layout.to_map(x)))
        return self.attn_grid(self.attn_block(x, layout), layout)


class PreLogits(nn.Module):
    """What the head does between pooling and the classifier: ``norm``, then ``tanh(fc(.))`` when
    ``hidden > 0`` (the official ``representation_size``); ``out_features`` is its width."""

    def __init__(self, dim: int, hidden: int, norm: str = "layernorm", eps: float = 1e-5):
        super().__init__()
        self.norm = create_norm(norm, dim, eps=eps)
        self.fc = nn.Linear(dim, hidden) if hidden else None
        self.act = nn.Tanh() if hidden else nn.Identity()
        self.out_features = hidden or dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.act(self.fc(x)) if self.fc is not None else x


def maxvit_attention(spec: MixerSpec, partition: str, size: int, rel_pos_bias: bool = True,
                     **attention: Any) -> Dict[str, Any]:
    """What MaxViT asks of attention: ``partition`` ``"window"`` (block attention, ``size = P``) or
    ``"grid"`` (grid attention, ``size = G``) with a relative position bias per group (sec. 3.2); a
    linear-cost core attends over the whole map (FLatten's rule); a non-attention mixer takes no attention
    parts."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    key = "window_size" if partition == "window" else "grid_size"
    return dict(attention, grouping=(partition, {key: size}), position=("relative",) if rel_pos_bias else ())


def _check_sizes(embed_dims: Tuple[int, ...], depths: Tuple[int, ...], dim_head: int, partition: int) -> None:
    if len(depths) < 1 or len(embed_dims) != len(depths) or min(depths) < 1:
        raise ValueError(f"depths {depths} and embed_dim {embed_dims} need one positive value per stage")
    bad = [d for d in embed_dims if d < 1 or d % dim_head]
    if dim_head < 1 or bad:
        raise ValueError(f"every embed_dim must be a positive multiple of dim_head={dim_head}; got {embed_dims}")
    if partition < 1:
        raise ValueError(f"window_size and grid_size must be >= 1, got {partition}")


class MaxViT(Backbone):
    """MaxViT (Tu et al., ECCV 2022) whose parts are arguments; see the module docstring.

    Sizes: ``embed_dim`` and ``depths`` per stage (timm's names), ``stem_width``, ``dim_head`` (32),
    ``window_size`` (block attention's ``P``) and ``grid_size`` (grid attention's ``G``; both ``img_size // 32``
    by default, the paper's 7 at 224), ``mlp_ratio``, ``expand_ratio`` / ``se_ratio`` (MBConv),
    ``head_hidden_size`` (the pre-logits width; default the last stage's, as every released model; 0: none).
    Feature taps are the stem and the four stages (timm's).
    """

    features_fmt = "NCHW"  # timm's: (B, C, H, W) maps from every tap and from forward_features

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 5, 2),
                 stem_width: int = 64, stem_bias: bool = True, dim_head: int = 32, window_size: Optional[int] = None,
                 grid_size: Optional[int] = None, mlp_ratio: float = 4.0, expand_ratio: float = 4.0,
                 se_ratio: float = 0.25, head_hidden_size: Optional[int] = None, qkv_bias: bool = True,
                 rel_pos_bias: bool = True, mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 norm: str = "layernorm", norm_eps: float = 1e-5,
                 bn_eps: float = 1e-3, shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 branch_scale: Optional[str] = None, featscale: bool = False, wiring: str = "pre",
                 init: str = "trunc_normal", drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, architecture: str = "maxvit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        img = img_size if isinstance(img_size, int) else img_size[0]
        window_size = max(img // 32, 1) if window_size is None else window_size  # the paper's P = G = 7 at 224
        grid_size = window_size if grid_size is None else grid_size
        embed_dims, depths = tuple(embed_dim), tuple(depths)
        _check_sizes(embed_dims, depths, dim_head, min(window_size, grid_size))
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.num_features = self.embed_dim = embed_dims[-1]
        self.patch_embed = MaxViTStem(in_chans, stem_width, stem_bias, bn_eps)
        self.stem_width = stem_width
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        ctx = dict(spec=spec, dim_head=dim_head, window=window_size, grid=grid_size, rel_pos_bias=rel_pos_bias,
                   mlp_ratio=mlp_ratio, conv=dict(expand_ratio=expand_ratio, se_ratio=se_ratio, eps=bn_eps,
                                                   act=_gelu_tanh),
                   attention=dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate),
                   block=dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                              branch_scale_init=shortcut_init, featscale=featscale, total_depth=sum(depths)))
        dpr, hw, prev, asked, stages = drop_path_rates(drop_path_rate, sum(depths)), (img, img), stem_width, [], []
        hw = tuple((s + 1) // 2 for s in hw)  # the stem's stride 2
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            rates, dpr = dpr[:depth], dpr[depth:]
            stage, hw = self._stage(prev, dim, depth, hw, 4 * 2 ** i, rates, ctx, asked)
            stages.append(stage)
            prev = dim
        check_stage_kwargs(spec.kwargs, asked)
        self.stages = nn.Sequential(*stages)
        hidden = self.num_features if head_hidden_size is None else head_hidden_size
        self.fc_norm = PreLogits(self.num_features, hidden, norm, norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.fc_norm.out_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.95)

    @staticmethod
    def _stage(prev: int, dim: int, depth: int, hw: Tuple[int, int], reduction: int, rates: List[float],
               ctx: Dict[str, Any], asked: list) -> Tuple[Stage, Tuple[int, int]]:
        """One stage: the strided MBConv (downsampler), then ``depth`` MaxViT blocks (the first without its
        own MBConv); ``asked`` collects each attention's parts for the ``mixer_kwargs`` check."""
        down = MBConvDownsample(prev, dim, stride=2, drop_path=rates[0], **ctx["conv"])
        hw = down.out_size(hw)
        layout, spec = TokenLayout(hw), ctx["spec"]
        blocks = []
        for j in range(depth):
            subs = []
            for partition, size in (("window", ctx["window"]), ("grid", ctx["grid"])):
                att = maxvit_attention(spec, partition, size, ctx["rel_pos_bias"], **ctx["attention"])
                asked.append((spec, (), att))
                mixer = spec.build(dim, dim // ctx["dim_head"], layout, lenient=True, **att)
                mlp = Mlp(dim, int(dim * ctx["mlp_ratio"]), act_layer=_gelu_tanh, drop=ctx["attention"]["proj_drop"])
                subs.append(Block(dim, mixer, mlp, drop_path=rates[j], **ctx["block"]))
            conv = MBConv(dim, dim, drop_path=rates[j], **ctx["conv"]) if j > 0 else None
            blocks.append(MaxViTBlock(*subs, conv=conv))
        return Stage(blocks, dim, reduction, hw, downsample=down), hw

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        init_weights(self, init, conv_fan_out=True)  # the official code's fan-out conv init

    # -- the contract: the stem is feature tap 0, then the four stages (timm's) ------------------------
    def _feature_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        self.check_input(x)
        return x, None

    def _feature_units(self) -> List[nn.Module]:
        return [self.patch_embed, *self.stages]

    def _feature_unit(self, i: int, unit: Any, x: torch.Tensor, layout: Optional[TokenLayout]):
        return self.forward_stem(x) if i == 0 else self._run(i - 1, unit, x, layout)

    def forward_tokens(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x, layout = self._run(i, stage, x, layout)
        return self._feature_end(x, layout, complete=True)

    def _feature_info(self) -> List[Dict[str, Any]]:
        return [dict(num_chs=self.stem_width, reduction=2, module="patch_embed")] + super()._feature_info()

    def _truncate_units(self, n: int) -> None:
        self.stages = self.stages[:max(n - 1, 0)]

    @property
    def head_hidden_size(self) -> int:
        """The width ``forward_head(..., pre_logits=True)`` returns (timm's name)."""
        return getattr(self.fc_norm, "out_features", self.num_features)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier on the pre-logits (``fc_norm``'s width), the pre-logits kept (timm's)."""
        if global_pool is not None:
            self._set_global_pool(global_pool)
        width, ref = self.head_hidden_size, next(self.parameters())
        self.num_classes = num_classes
        self.head = (nn.Linear(width, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                     else nn.Identity()).train(self.training)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """The stem (``embed``); per stage its strided MBConv (``downsample``), then per block its MBConv
        (``conv``) and the attention and MLP halves of block attention (``...attn_block.attn`` / ``.mlp``) and of
        grid attention (``...attn_grid.*``); a parallel-wired sub-block is one ``block`` entry."""
        x, layout = self.forward_stem(x)
        out = [self._entry("patch_embed", "embed", x, layout, 0)]
        for i, (name, prefix, stage) in enumerate(self.named_stages()):
            x, layout = self._enter(i, stage, x, layout, out, name)
            for j, blk in enumerate(stage.blocks):
                if blk.conv is not None:
                    x = layout.from_map(blk.conv(layout.to_map(x)))
                    out.append(self._entry(f"{prefix}.{j}.conv", "conv", x, layout, i))
                for sub in ("attn_block", "attn_grid"):
                    b, at = getattr(blk, sub), f"{prefix}.{j}.{sub}"
                    x = b.attn_half(x, layout)
                    if b.fused_halves:
                        out.append(self._entry(at, "block", x, layout, i))
                        continue
                    out.append(self._entry(f"{at}.attn", "attn", x, layout, i))
                    x = b.mlp_half(x, layout)
                    out.append(self._entry(f"{at}.mlp", "mlp", x, layout, i))
        return out

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem, then one group per stage; the head's pre-logits (``fc_norm``) join the
        classifier's group, as timm's ``head.norm`` and ``head.pre_logits``."""
        return dict(stem=r"^patch_embed", blocks=[(r"^stages\.(\d+)", None)])


# -- registered recipes (the paper's Table 1 / official configs; timm's names) ------------------------------
_SIZES = {  # drop_path_rate: 1 - survival_prob of the official ImageNet-1K configs
    "tiny": dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=512,
                 drop_path_rate=0.2),
    "small": dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=768,
                  drop_path_rate=0.3),
    "base": dict(embed_dim=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64, head_hidden_size=768,
                 drop_path_rate=0.4),
    "large": dict(embed_dim=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128, head_hidden_size=1024,
                  drop_path_rate=0.6),
    # XL (Table 2) was released ImageNet-21K-pretrained only: no ImageNet-1K drop-path rate, timm's 0
    "xlarge": dict(embed_dim=(192, 384, 768, 1536), depths=(2, 6, 14, 2), stem_width=192, head_hidden_size=1536),
}
_MINUS_ONE_TO_ONE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # the TF weights' [-1, 1] inputs


def _recipe(size: str, img: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model defaults, data config) of ``maxvit_{size}_tf_{img}`` as timm's default tag: windows and grids are
    ``img // 32`` (7, 12, 16; sec. 4.1's 384 and 512 fine-tuning); 384 and 512 take inputs in [-1, 1], squashed
    whole; XL at 224 is the ImageNet-21K model (21843 classes), the only one released at that size."""
    defaults = dict(_SIZES[size], img_size=img)
    if img != 224:
        return defaults, dict(_MINUS_ONE_TO_ONE, crop_pct=1.0, crop_mode="squash")
    if size == "xlarge":
        return dict(defaults, num_classes=21843), dict(_MINUS_ONE_TO_ONE, crop_pct=0.95)
    return defaults, dict(crop_pct=0.95)


for _size in _SIZES:
    for _img in (224, 384, 512):
        _defaults, _data = _recipe(_size, _img)
        register_recipe(MaxViT, f"maxvit_{_size}_tf_{_img}", _defaults,
                        f"MaxViT-{'XL' if _size == 'xlarge' else _size[0].upper()} at {_img} px (Tu et al., ECCV "
                        "2022), the official TensorFlow models' sizes and numerics (timm's maxvit_*_tf).", **_data)
