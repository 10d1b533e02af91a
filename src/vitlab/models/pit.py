"""PiT, the pooling-based Vision Transformer, built from vitlab parts.

"Rethinking Spatial Dimensions of Vision Transformers" (Heo, Yun, Han, Chun, Choe and Oh, ICCV 2021,
sec. 3.2).  ViT blocks run in three stages on a shrinking token map: a convolutional stem
(one ``patch_size`` conv with ``stride``, overlapping for ``stride < patch_size``) with a learned position
table on its map, then between stages a **pooling layer** (:class:`Pooling`: a depthwise ``stride + 1``
conv with stride 2 that also widens the channels, and a Linear ``fc`` for the class / distillation
tokens, which have no place on the map), so the width grows as the map shrinks (``base_dims[i] *
heads[i]``: the head dimension is fixed per stage).  The class token joins at the stem and is carried
through the poolings; the head reads it after the final norm.  The distilled variants (DeiT's recipe,
Touvron et al., ICML 2021) add a distillation token (a second row of ``cls_token``, as timm) and a second
head ``head_dist``; in evaluation the two heads' logits are averaged.

Every part is an argument, as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``:
the map's coordinates) / ``mixer_kwargs`` (global attention over the class tokens and the map), ``mlp`` (a channel
mixer), ``norm`` (the blocks' and the final norm), ``branch_scale`` (alias ``shortcut``) / ``shortcut_init``,
``featscale``, ``wiring``, ``init`` (``None``: PyTorch's default Linear init, as the official code and timm; or a vitlab
initialiser).

Keyword names, sizes and state-dict keys are timm's ``PoolingVisionTransformer`` (``patch_embed.conv``,
``pos_embed``, ``cls_token``, ``transformers.{i}.blocks.{j}.*``, ``norm``, ``head``, ``head_dist``) except
two, mapped by :mod:`vitlab.interop.timm_pit`: the poolings are the stages' ``downsample`` (timm's
``transformers.{i}.pool``) and the position table is stored as tokens ``(1, h*w, C)`` (timm's map
``(1, C, h, w)``), so the one staged :class:`~vitlab.models.backbone.Backbone` adds and resizes it as any other.
As timm's, ``forward_features`` returns the normalised class (and distillation) tokens ``(B, P, C)``;
``forward_intermediates`` gives each stage's map (``norm=True`` applies the final norm to the last map, vitlab's
rule for every staged model; timm's PiT ignores ``norm``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vitlab.layers import MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.layers.mlp import CHANNEL_MIXERS
from vitlab.models.backbone import Backbone, Downsample, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["ConvEmbedding", "Pooling", "PoolingVisionTransformer"]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvEmbedding(nn.Module):
    """PiT's stem (Heo et al., ICCV 2021, sec. 3.2): one ``patch_size`` conv with ``stride``, no padding and no
    norm; ``(B, C, H, W)`` -> ``(tokens, (h, w))``.  Names are timm's (``conv``)."""

    def __init__(self, in_chans: int, dim: int, img_size: int, patch_size: int, stride: int):
        super().__init__()
        if not 0 < stride <= patch_size <= img_size:
            raise ValueError(f"PiT's stem needs 0 < stride <= patch_size <= img_size, got stride={stride}, "
                             f"patch_size={patch_size}, img_size={img_size}")
        self.img_size, self.patch_size, self.stride = (img_size, img_size), patch_size, stride
        self.grid_size = (_conv_out(img_size, patch_size, stride, 0),) * 2
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.conv(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])


class Pooling(Downsample):
    """PiT's pooling layer (Heo et al., ICCV 2021, sec. 3.2): the map through a depthwise
    ``(stride + 1) x (stride + 1)`` conv with ``stride`` and padding ``stride // 2`` whose ``out_dim / in_dim``
    filters per channel widen it, the prefix (class / distillation) tokens through a Linear ``fc`` to the new
    width.  ``(B, P + h*w, in_dim)`` -> ``(B, P + h'*w', out_dim)``, prefix first (``takes_prefix``).
    Names are timm's (``conv``, ``fc``)."""

    takes_prefix = True  # the class tokens are carried through the pooling, mapped by fc

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        if out_dim % in_dim:
            raise ValueError(f"PiT's depthwise pooling needs out_dim a multiple of in_dim (its filters per "
                             f"channel), got {in_dim} -> {out_dim}")
        self.stride = stride
        self.conv = nn.Conv2d(in_dim, out_dim, stride + 1, stride=stride, padding=stride // 2, groups=in_dim)
        self.fc = nn.Linear(in_dim, out_dim)

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        return tuple(_conv_out(s, self.stride + 1, self.stride, self.stride // 2) for s in hw)  # type: ignore

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, Tuple[int, int]]:
        fm = self.conv(layout.to_map(x))
        tokens = fm.flatten(2).transpose(1, 2)
        p = layout.num_prefix
        return (torch.cat([self.fc(x[:, :p]), tokens], dim=1) if p else tokens), tuple(fm.shape[-2:])


def _per_stage(value: Any, n: int, what: str) -> Tuple[Any, ...]:
    t = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(t) != n or any(int(v) < 1 for v in t):
        raise ValueError(f"{what} needs {n} positive values (one per stage), got {t}")
    return t


class PoolingVisionTransformer(Backbone):
    """PiT (Heo et al., ICCV 2021) whose parts are arguments; see the module docstring.  Sizes and keyword
    names are timm's: ``patch_size``, ``stride``, ``base_dims`` (head dimension per stage), ``depth`` and
    ``heads`` (per stage), ``mlp_ratio``, ``distilled``, ``global_pool`` (``'token'`` only)."""

    stage_attr = "transformers"
    prefix_names = ("cls_token",)  # one tensor of 1 (class) or 2 (class, distillation) rows, as timm's
    no_embed_class = True  # the position table covers the map; the class tokens join after it
    global_pool = "token"
    _global_pools = ("token",)

    def __init__(self, img_size: int = 224, patch_size: int = 16, stride: int = 8, base_dims: Sequence[int] = (48,) * 3,
                 depth: Sequence[int] = (2, 6, 4), heads: Sequence[int] = (2, 4, 8), mlp_ratio: float = 4.0,
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "token", distilled: bool = False,
                 mixer: str = "softmax", core: Optional[str] = None, modifiers: Sequence[str] = (),
                 attn_position: Sequence[Any] = (), mixer_kwargs: Optional[Dict[str, Any]] = None, mlp: str = "mlp",
                 norm: str = "layernorm", norm_eps: float = 1e-6, shortcut: str = "plain",
                 branch_scale: Optional[str] = None, shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: Optional[str] = None, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 architecture: str = "pit", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"PiT's head reads the class token: global_pool must be 'token', got {global_pool!r}")
        depth = _per_stage(depth, len(depth) if isinstance(depth, (list, tuple)) else 3, "depth")
        heads, base_dims = _per_stage(heads, len(depth), "heads"), _per_stage(base_dims, len(depth), "base_dims")
        img = img_size if isinstance(img_size, int) else img_size[0]
        dims = [b * h for b, h in zip(base_dims, heads)]
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.num_features = self.head_hidden_size = self.embed_dim = dims[-1]
        self.base_dims, self.heads = base_dims, heads
        self.patch_embed = ConvEmbedding(in_chans, dims[0], img, patch_size, stride)
        self.grid_size = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dims[0]))
        self.cls_token = nn.Parameter(torch.zeros(1, 2 if distilled else 1, dims[0]))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        block_kw = dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                        branch_scale_init=shortcut_init, total_depth=sum(depth), featscale=featscale)
        attention = dict(qkv_bias=True, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        self.transformers = nn.ModuleList(self._build_stages(spec, dims, depth, heads, stride, mlp, mlp_ratio,
                                                             attention, block_kw, proj_drop_rate, drop_path_rate))
        self.norm = create_norm(norm, dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()) if distilled \
            else None
        self.distilled_training = False
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.9)

    def _build_stages(self, spec: MixerSpec, dims: List[int], depth: Tuple[int, ...], heads: Tuple[int, ...],
                      stride: int, mlp: str, mlp_ratio: float, attention: Dict[str, Any], block_kw: Dict[str, Any],
                      proj_drop: float, drop_path_rate: float) -> List[Stage]:
        """Per stage: the pooling from the previous stage (none before the first) and ViT blocks on the class
        tokens and the map, global attention with the user's mixer."""
        dpr = drop_path_rates(drop_path_rate, sum(depth))
        grid, prefix, stages, k = self.grid_size, self.cls_token.shape[1], [], 0
        for i, d in enumerate(depth):
            pool = Pooling(dims[i - 1], dims[i], stride=2) if i else None
            grid = pool.out_size(grid) if pool is not None else grid
            layout = TokenLayout(grid, prefix)
            blocks = [Block(dims[i], spec.build(dims[i], heads[i], layout, **attention),
                            CHANNEL_MIXERS.get(mlp)(dims[i], int(dims[i] * mlp_ratio), drop=proj_drop),
                            drop_path=dpr[k + j], **block_kw) for j in range(d)]
            stages.append(Stage(blocks, dims[i], stride * 2 ** i, grid, downsample=pool))
            k += d
        return stages

    @torch.no_grad()
    def _init_weights(self, init: Optional[str]) -> None:
        # the official code: truncated normal (0.02) tables and tokens, Linear layers at PyTorch's default
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if init is not None:
            init_weights(self, init)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(f"PiT's position table is fixed to img_size {self.img_size}: got a "
                             f"{x.shape[-2]}x{x.shape[-1]} input; create the model with img_size={x.shape[-2]}")

    # -- features and head (timm's: the final norm reads the class tokens only) ------------------
    def _feature_end(self, x: torch.Tensor, layout: TokenLayout, complete: bool) -> torch.Tensor:
        x = x[:, :layout.num_prefix]
        return self.norm(x) if complete else x

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(class logits, distillation logits)`` instead of their mean."""
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.head_dist is None:
            return super().forward_head(x, pre_logits)
        from vitlab.models.deit import distilled_head

        return distilled_head(self, x, pre_logits)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Fresh ``head`` (and ``head_dist``) for ``num_classes`` (0: none)."""
        super().reset_classifier(num_classes, global_pool)
        if self.head_dist is not None:
            ref = self.pos_embed
            self.head_dist = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                              if num_classes > 0 else nn.Identity()).train(self.training)

    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)


# -- registered recipes (timm's names and sizes; Heo et al., ICCV 2021, sec. 3.4) -------------------------
_SIZES = {
    "ti": dict(patch_size=16, stride=8, base_dims=(32, 32, 32), depth=(2, 6, 4), heads=(2, 4, 8)),
    "xs": dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(2, 4, 8)),
    "s": dict(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12)),
    "b": dict(patch_size=14, stride=7, base_dims=(64, 64, 64), depth=(3, 6, 4), heads=(4, 8, 16)),
}

for _size, _cfg in _SIZES.items():
    register_recipe(PoolingVisionTransformer, f"pit_{_size}_224", dict(_cfg, mlp_ratio=4),
                    f"PiT-{_size.upper()} (Heo et al., ICCV 2021), timm's sizes.", crop_pct=0.9,
                    fixed_input_size=True, first_conv="patch_embed.conv", classifier="head")
    register_recipe(PoolingVisionTransformer, f"pit_{_size}_distilled_224", dict(_cfg, mlp_ratio=4, distilled=True),
                    f"PiT-{_size.upper()} distilled (Heo et al., ICCV 2021; DeiT's distillation token), timm's "
                    "sizes.", crop_pct=0.9, fixed_input_size=True, first_conv="patch_embed.conv",
                    classifier=("head", "head_dist"))
