"""LeViT, built from vitlab parts.

"LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference" (Graham, El-Nouby, Touvron, Stock,
Joulin, Jegou and Douze, ICCV 2021, sec. 4).  A convolutional stem (four 3x3 stride-2 convs with BatchNorm and
hard-swish between them, stride 16) gives a token map; three stages of residual attention and MLP blocks run on
it, each Linear followed by its BatchNorm (``linear_norm`` projection and channel mixer,
:mod:`vitlab.layers.linear_norm`) and no norm before the branches; attention has per-head keys of ``key_dim``,
values ``attn_ratio`` times wider, a learned bias per head and offset ``(|dy|, |dx|)`` (position part ``offset``)
and hard-swish before its output projection.  Between stages a **shrinking attention** (:class:`LevitDownsample`:
queries from every second token, grouping ``subsample``; ``in_dim / key_dim`` heads, values 4x, no residual) widens
the channels, followed by an MLP residual.  The head averages the last map and applies BatchNorm + Linear; the
distilled models (all of timm's) add ``head_dist`` (DeiT's distillation, averaged in evaluation,
:func:`vitlab.models.deit.distilled_head`).  As the official code, every residual shares one drop-path rate.

Parts, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)`` is refused by the
subsampling attention) / ``mixer_kwargs`` (every attention, the shrinking ones too; a non-attention mixer replaces the
blocks' attention, the shrinking attention stays softmax); ``mlp`` (a channel mixer, ``linear_norm`` by default);
``norm`` (the norm of every LinearNorm and of the head: ``batchnorm`` as the paper, or any :data:`~vitlab.layers.NORMS`
name; the conv stem keeps BatchNorm2d); ``branch_scale`` / ``shortcut_init``, ``featscale``, ``wiring`` (``pre`` and
``parallel``: LeViT's blocks have no norm outside their branches, so ``post`` / ``end`` are refused); ``init``
(``None``: the official init).

State-dict keys equal timm's ``Levit`` / ``LevitDistilled`` (``stem.conv{1-4}.{linear,bn}``,
``stages.{i}.downsample.{attn_downsample.{q.ln,kv,proj.ln,attention_biases},mlp.{ln1,ln2}}``,
``stages.{i}.blocks.{j}.{attn.{qkv,proj.ln,attention_biases},mlp.{ln1,ln2}}``, ``head.{bn,linear}``,
``head_dist``); ``levit_conv_*`` stores the same tensors with timm's 1x1-conv shapes
(:mod:`vitlab.interop.timm_levit`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from vitlab.layers import DropPath, MixerSpec, TokenLayout, init_weights
from vitlab.layers.linear_norm import ConvNorm, NormLinear
from vitlab.layers.mixers import check_stage_kwargs
from vitlab.layers.mlp import CHANNEL_MIXERS
from vitlab.models.backbone import Backbone, Downsample, Stage
from vitlab.models.base import VitlabModel, make_default_cfg, register_recipe
from vitlab.models.block import Block

__all__ = ["LevitStem", "LevitDownsample", "Levit", "ACTIVATIONS"]

# timm's names of the activations LeViT's configs use (hard-swish: the paper's; silu: timm's later experiments)
ACTIVATIONS: Dict[str, Type[nn.Module]] = {"hard_swish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
                                           "relu": nn.ReLU}
_STEM_STRIDES = {"s16": 16, "s8": 8}


def _activation(name: str, what: str) -> Type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"{what}={name!r} is not one of LeViT's activations: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class LevitStem(nn.Sequential):
    """LeViT's stem (Graham et al., ICCV 2021, sec. 4.2): four 3x3 stride-2 conv + BatchNorm units widening to
    ``dim / 8, dim / 4, dim / 2, dim``, ``act`` (hard-swish) between them; image -> ``(tokens, (h, w))`` at stride
    16.  ``stride=8``: three units widening to ``dim / 4, dim / 2, dim`` (timm's stride-8 experiments).  Names as
    timm's ``Stem16`` / ``Stem8``."""

    def __init__(self, in_chans: int, dim: int, stride: int = 16, act: Type[nn.Module] = nn.Hardswish):
        super().__init__()
        n = {8: 3, 16: 4}[stride]
        widths = (in_chans,) + tuple(dim // 2 ** (n - 1 - i) for i in range(n))
        self.stride = stride
        for i in range(n):
            self.add_module(f"conv{i + 1}", ConvNorm(widths[i], widths[i + 1]))
            if i < n - 1:
                self.add_module(f"act{i + 1}", act())

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = super().forward(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


class LevitDownsample(Downsample):
    """LeViT's shrinking attention block (Graham et al., ICCV 2021, sec. 4.2): ``attn_downsample`` (attention whose
    queries are every second token of the map, ``in_dim / key_dim`` heads, values ``attn_ratio`` x ``key_dim``, the
    output ``out_dim`` wide; no residual, the width changes), then ``x + drop_path(mlp(x))``.  ``(B, h*w, in_dim)``
    -> ``(B, h'*w', out_dim)``, ``h' = ceil(h / 2)``.  Names as timm's ``LevitDownsample``."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, out_grid: Tuple[int, int], drop_path: float = 0.0):
        super().__init__()
        self.attn_downsample, self.mlp = attn, mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.out_grid = tuple(out_grid)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.attn_downsample(x, layout)
        return x + self.drop_path(self.mlp(x, TokenLayout(self.out_grid))), self.out_grid


def _per_stage(value: Any, n: int, what: str) -> Tuple[Any, ...]:
    t = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(t) != n:
        raise ValueError(f"{what} needs {n} values (one per stage), got {t}")
    return t


class Levit(Backbone):
    """LeViT (Graham et al., ICCV 2021) whose parts are arguments; see the module docstring.  Sizes and keyword
    names are timm's: ``embed_dim``, ``depth``, ``num_heads`` (per stage), ``key_dim``, ``attn_ratio`` and
    ``mlp_ratio`` (per stage or one value); ``distilled`` adds ``head_dist``; ``head_norm=False`` drops the head's
    norm (a plain Linear); ``use_conv`` returns ``(B, C, H, W)`` maps from ``forward_features`` (timm's
    ``levit_conv_*``); ``stem_type`` ``"s16"`` (the paper's) or ``"s8"`` (a three-conv stride-8 stem); ``act_layer``
    the activation of the stem, the MLPs and (unless ``attn_act_layer``) before every attention's output
    projection (``"hard_swish"``, the paper's; timm's ``*_s8``, ``levit_512`` and ``*d`` use ``"silu"``)."""

    stage_attr = "stages"
    global_pool = "avg"
    _global_pools = ("avg",)
    _no_weight_decay_keys = VitlabModel._no_weight_decay_keys + ("attention_biases",)

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (192,), key_dim: int = 64, depth: Sequence[int] = (12,),
                 num_heads: Union[int, Sequence[int]] = (3,), attn_ratio: Union[float, Sequence[float]] = 2.0,
                 mlp_ratio: Union[float, Sequence[float]] = 2.0, distilled: bool = True, head_norm: bool = True,
                 use_conv: bool = False, stem_type: str = "s16", act_layer: str = "hard_swish",
                 attn_act_layer: Optional[str] = None, global_pool: str = "avg", mixer: str = "softmax",
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None, mlp: str = "linear_norm", norm: str = "batchnorm",
                 shortcut: str = "plain",
                 branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: Optional[str] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 architecture: str = "levit", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if wiring not in ("pre", "parallel"):
            raise ValueError(f"wiring={wiring!r} is not defined for LeViT: its blocks have no norm outside their "
                             "branches (each Linear carries its own), so only 'pre' and 'parallel' differ; got "
                             f"{wiring!r}")
        if global_pool != "avg":
            raise ValueError(f"LeViT's head averages the last map: global_pool must be 'avg', got {global_pool!r}")
        dims = tuple(embed_dim)
        n = len(dims)
        depth = _per_stage(depth, n, "depth")
        heads, ratios = _per_stage(num_heads, n, "num_heads"), _per_stage(attn_ratio, n, "attn_ratio")
        if stem_type not in _STEM_STRIDES:
            raise ValueError(f"stem_type must be one of {sorted(_STEM_STRIDES)}, got {stem_type!r}")
        stride, act = _STEM_STRIDES[stem_type], _activation(act_layer, "act_layer")
        img = img_size if isinstance(img_size, int) else img_size[0]
        if img < stride or img % stride:
            raise ValueError(f"LeViT's stem has stride {stride}: img_size must be a positive multiple of {stride}, "
                             f"got {img_size}")
        self.num_classes, self.in_chans, self.img_size, self.norm_name = num_classes, in_chans, img, norm
        self.num_features = self.head_hidden_size = dims[-1]
        self.embed_dim, self.drop_rate, self.head_norm = dims, drop_rate, head_norm
        self.features_fmt = "NCHW" if use_conv else "NLC"
        self.stem = LevitStem(in_chans, dims[0], stride, act)
        self.grid_size = (img // stride, img // stride)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        sizes = dict(dims=dims, depth=depth, heads=heads, ratios=ratios, key_dim=key_dim,
                     mlp_ratios=_per_stage(mlp_ratio, n, "mlp_ratio"), stride=stride)
        parts = dict(act=act, attn_act=_activation(attn_act_layer, "attn_act_layer") if attn_act_layer else act,
                     mlp=mlp, norm=norm, wiring=wiring, branch_scale=branch_scale or shortcut,
                     shortcut_init=shortcut_init, featscale=featscale, attn_drop=attn_drop_rate,
                     proj_drop=proj_drop_rate, drop_path=drop_path_rate)
        self.stages = nn.Sequential(*self._build_stages(spec, sizes, parts))
        self.head_drop = nn.Identity()  # the dropout sits inside the head, between its norm and Linear (timm's)
        self.head = self._make_head(num_classes)
        self.head_dist = self._make_head(num_classes) if distilled else None
        self.distilled_training = False
        self.init_name = init
        if init is not None:
            init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.9)

    # -- building ---------------------------------------------------------------------------------------
    def _attention(self, spec: MixerSpec, dim: int, heads: int, key_dim: int, ratio: float, grid, parts,
                   shrink: Optional[int] = None) -> nn.Module:
        """One attention of LeViT with the user's parts: LinearNorm projections, the offset bias; ``shrink``
        (the output width) makes it the shrinking attention (subsampled queries, no zero-init output norm)."""
        att = dict(projection=("linear_norm", dict(proj_norm=parts["norm"], zero_out=shrink is None,
                                                   act_layer=parts["attn_act"])),
                   position=("offset",), head_dim=key_dim, value_dim=int(ratio * key_dim),
                   attn_drop=parts["attn_drop"], proj_drop=parts["proj_drop"])
        if shrink is not None:
            att.update(grouping=("subsample", dict(query_stride=2)), out_dim=shrink)
            spec = spec if spec.attention else MixerSpec(kwargs=spec.kwargs)  # only attention shrinks the map
        return spec.build(dim, heads, TokenLayout(tuple(grid)), lenient=True, **att)

    def _mlp(self, parts, dim: int, ratio: float) -> nn.Module:
        kw = dict(norm=parts["norm"], act_layer=parts["act"]) if parts["mlp"] == "linear_norm" else {}
        return CHANNEL_MIXERS.get(parts["mlp"])(dim, int(dim * ratio), drop=parts["proj_drop"], **kw)

    def _build_stages(self, spec: MixerSpec, sizes: Dict[str, Any], parts: Dict[str, Any]):
        """Per stage: the shrinking attention from the previous stage (none before the first), then its blocks."""
        dims, kd, grid, stages, checked = sizes["dims"], sizes["key_dim"], self.grid_size, [], []
        block_kw = dict(norm=None, wiring=parts["wiring"], branch_scale=parts["branch_scale"],
                        branch_scale_init=parts["shortcut_init"], total_depth=sum(sizes["depth"]),
                        featscale=parts["featscale"], drop_path=parts["drop_path"])
        for i, dim in enumerate(dims):
            down = None
            if i:  # sec. 4.2: in_dim / key_dim heads, values 4x key_dim, MLP ratio 2
                out = tuple((g - 1) // 2 + 1 for g in grid)
                attn = self._attention(spec, dims[i - 1], dims[i - 1] // kd, kd, 4.0, grid, parts, shrink=dim)
                down = LevitDownsample(attn, self._mlp(parts, dim, 2.0), out, parts["drop_path"])
                checked.append((spec, (), dict(projection="linear_norm", grouping="subsample", position=("offset",))))
                grid = out
            blocks = [Block(dim, self._attention(spec, dim, sizes["heads"][i], kd, sizes["ratios"][i], grid, parts),
                            self._mlp(parts, dim, sizes["mlp_ratios"][i]), **block_kw)
                      for _ in range(sizes["depth"][i])]
            checked.append((spec, (), dict(projection="linear_norm", position=("offset",))))
            stages.append(Stage(blocks, dim, sizes["stride"] * 2 ** i, grid, downsample=down))
        check_stage_kwargs(spec.kwargs, checked)
        return stages

    def _make_head(self, num_classes: int, ref: Optional[torch.Tensor] = None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = NormLinear(self.num_features, num_classes, self.norm_name, self.drop_rate, self.head_norm)
        return head if ref is None else head.to(device=ref.device, dtype=ref.dtype)

    # -- running ----------------------------------------------------------------------------------------
    @property
    def patch_embed(self) -> nn.Module:
        """The stem under the name the staged Backbone reads (timm's name ``stem`` keeps the state-dict keys)."""
        return self.stem

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"LeViT's attention biases are sized for img_size {self.img_size}: got a "
                             f"{x.shape[-2]}x{x.shape[-1]} input; create the model with img_size={x.shape[-2]}")

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(class logits, distillation logits)`` instead of their mean."""
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        x = self._pool(x)
        if pre_logits or self.head_dist is None:
            return x if pre_logits else self.head(x)
        from vitlab.models.deit import distilled_head

        return distilled_head(self, torch.stack([x, x], dim=1))  # both heads read the pooled map

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Fresh ``head`` (and ``head_dist``): norm + Linear for ``num_classes`` (0: none)."""
        if global_pool is not None:
            self._set_global_pool(global_pool)
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, ref).train(self.training)
        if self.head_dist is not None:
            self.head_dist = self._make_head(num_classes, ref).train(self.training)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem, then per stage (coarse) or per block with the shrinking attention first."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])


# -- registered recipes (timm's names and sizes: the paper's five models, Graham et al., ICCV 2021) ----------------
_SIZES = {
    "128s": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)),
    "128": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)),
    "192": dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)),
    "256": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)),
    "384": dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4)),
}


def _heads(kw: Dict[str, Any]):
    return ("head.linear", "head_dist.linear") if kw.get("distilled", True) else "head.linear"


def _register(name: str, defaults: Dict[str, Any], doc: str) -> None:
    register_recipe(Levit, name, defaults, doc, crop_pct=0.9, fixed_input_size=True, first_conv="stem.conv1.linear",
                    classifier=_heads)


# timm's untrained experiments beyond the paper (no weights): stride-8 stem, wider, deeper; SiLU throughout, and
# only levit_384_s8 keeps the distillation head
_EXPERIMENTS = {
    "384_s8": dict(_SIZES["384"], act_layer="silu", stem_type="s8"),
    "512_s8": dict(embed_dim=(512, 640, 896), key_dim=64, num_heads=(8, 10, 14), depth=(4, 4, 4), act_layer="silu",
                   stem_type="s8", distilled=False),
    "512": dict(embed_dim=(512, 768, 1024), key_dim=64, num_heads=(8, 12, 16), depth=(4, 4, 4), act_layer="silu",
                distilled=False),
    "256d": dict(_SIZES["256"], depth=(4, 8, 6), act_layer="silu", distilled=False),
    "512d": dict(embed_dim=(512, 640, 768), key_dim=64, num_heads=(8, 10, 12), depth=(4, 8, 6), act_layer="silu",
                 distilled=False),
}

for _size, _cfg in _SIZES.items():
    _register(f"levit_{_size}", _cfg, f"LeViT-{_size.upper()} (Graham et al., ICCV 2021), distilled, timm's sizes.")
    _register(f"levit_conv_{_size}", dict(_cfg, use_conv=True),
              f"LeViT-{_size.upper()} (Graham et al., ICCV 2021), timm's 1x1-conv layout: (B, C, H, W) features.")
for _size, _cfg in _EXPERIMENTS.items():
    _what = f"timm's LeViT experiment {_size} (Graham et al., ICCV 2021, scaled by timm; untrained), SiLU"
    _register(f"levit_{_size}", _cfg, _what + ".")
    _register(f"levit_conv_{_size}", dict(_cfg, use_conv=True), _what + ", 1x1-conv layout: (B, C, H, W) features.")
