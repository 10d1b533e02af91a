"""PVTv2, built from vitlab parts.

"PVT v2: Improved Baselines with Pyramid Vision Transformer" (Wang et al., Computational Visual
Media 2022).  Three changes to PVT v1 (:mod:`vitlab.models.pvt`): an **overlapping patch
embedding** (7x7 stride 4, then 3x3 stride 2, zero padding, + LayerNorm), a **convolutional FFN**
(a 3x3 depthwise conv between the MLP's two linear layers) that replaces the position embeddings,
and an optional **linear SRA** (``linear=True``: keys/values average-pooled to 7x7).  Each stage
ends with a LayerNorm; the classifier averages the last map.

Parts as in PVT: ``mixer`` (``softmax`` | ``attnscale`` | ``cosine`` as SRA cores;
``focused_linear`` = FLatten's focused linear attention over all tokens, no key reduction, "FLatten
Transformer", Han et al., ICCV 2023), ``norm`` (every LayerNorm), ``shortcut``, ``featscale``,
``init``, ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)`` is refused with reduced keys, as in PVT).

State-dict keys are timm's ``PyramidVisionTransformerV2`` keys (``patch_embed.{proj,norm}``,
``stages.{i}.downsample.{proj,norm}``, ``stages.{i}.blocks.{j}.{norm1, attn.q, attn.kv, attn.sr,
attn.norm, attn.proj, norm2, mlp.fc1, mlp.dwconv, mlp.fc2}``, ``stages.{i}.norm``, ``head``), so the
timm conversion is the identity (:mod:`vitlab.interop.timm_pvt_v2`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from vitlab.layers import create_norm, init_weights
from vitlab.layers import MixerSpec, TokenLayout
from vitlab.models.backbone import Backbone, ConvPatchEmbed, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import drop_path_rates
from vitlab.models.pvt import pvt_block, stage_sizes

__all__ = ["OverlapPatchEmbed", "PyramidVisionTransformerV2"]


class OverlapPatchEmbed(ConvPatchEmbed):
    """Overlapping patch embedding of PVTv2 (Wang et al., 2022): ``k x k`` conv with stride ``s``
    and padding ``k // 2``, then a norm; an image or the previous stage's map -> ``(tokens, hw)``.
    Names match timm."""

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768,
                 norm: str = "layernorm"):
        if patch_size <= stride:
            raise ValueError(f"an overlapping patch embedding needs patch_size > stride, got {patch_size} <= {stride}")
        super().__init__(in_chans, embed_dim, patch_size, stride, patch_size // 2, norm, 1e-5)
        self.patch_size = patch_size


class PyramidVisionTransformerV2(Backbone):
    """PVTv2 (Wang et al., 2022) whose parts are arguments; see the module docstring.

    Any input size works (the maps are computed by the convs); with ``mixer='focused_linear'``
    the key position encoding fixes the token count, so the input must be ``img_size``.
    """

    features_fmt = "NCHW"  # timm's: each stage and forward_features give (B, C, H, W) maps

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, linear: bool = False,
                 mixer: str = "softmax", norm: str = "layernorm", shortcut: str = "plain",
                 shortcut_init: Optional[float] = None, featscale: bool = False, init: str = "trunc_normal",
                 wiring: str = "pre",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, mixer_kwargs: Optional[Dict[str, Any]] = None, core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (), branch_scale: Optional[str] = None,
                 architecture: str = "pvt_v2", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths, embed_dims, num_heads, mlp_ratios, sr_ratios = stage_sizes(depths, embed_dims, num_heads, mlp_ratios,
                                                                           sr_ratios, drop_path_rate)
        img = img_size if isinstance(img_size, int) else img_size[0]
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.embed_dim = embed_dims[-1]
        self.img_size = img
        self.patch_embed = OverlapPatchEmbed(7, 4, in_chans, embed_dims[0], norm)
        grid = self.patch_embed.out_size((img, img))
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        stages, cur = [], 0
        for i, depth in enumerate(depths):
            bk = dict(num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i], linear_sr=linear,
                      qkv_bias=qkv_bias, spec=spec, norm=norm, shortcut=branch_scale or shortcut,
                      shortcut_init=shortcut_init, featscale=featscale, drop=drop_rate, attn_drop=attn_drop_rate,
                      wiring=wiring,
                      norm_eps=norm_eps, total_depth=sum(depths), dwconv_mlp=True)
            down = OverlapPatchEmbed(3, 2, embed_dims[i - 1], embed_dims[i], norm) if i > 0 else None
            grid = down.out_size(grid) if down is not None else grid
            blocks = [pvt_block(embed_dims[i], layout=TokenLayout(grid), drop_path=dpr[cur + j], **bk)
                      for j in range(depth)]
            stages.append(Stage(blocks, embed_dims[i], 4 * 2 ** i, grid, downsample=down,
                                norm=create_norm(norm, embed_dims[i], eps=norm_eps)))
            cur += depth
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans, crop_pct=0.9)

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        init_weights(self, init, conv_fan_out=True)  # the official code's fan-out conv init

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if x.shape[-2] < 32 or x.shape[-1] < 32:
            raise ValueError(f"PVTv2 needs inputs of at least 32x32 (overall stride 32), got "
                             f"{x.shape[-2]}x{x.shape[-1]}")

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem, then one group per stage (its downsample, blocks and norm)."""
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)")


# -- registered recipes (timm's names and sizes) -------------------------------------------------
_V2_SIZES = {
    "b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8)),
    "b1": dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b2": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b3": dict(depths=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b4": dict(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b5": dict(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
               mlp_ratios=(4, 4, 4, 4)),
    "b2_li": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), linear=True),
}


def _register(name: str, defaults: Dict[str, Any], doc: str) -> None:
    register_recipe(PyramidVisionTransformerV2, name, defaults, doc, crop_pct=0.9)


for _size, _cfg in _V2_SIZES.items():
    _register(f"pvt_v2_{_size}", _cfg, f"PVTv2-{_size.upper()} (Wang et al., 2022), timm's sizes.")
for _size in ("b0", "b1", "b2", "b3", "b4"):
    # FLatten-PVTv2 (Han et al., ICCV 2023): focused linear attention (p=3, k=5) in all stages, sr = 1
    _register(f"flatten_pvt_v2_{_size}",
              dict(_V2_SIZES[_size], mixer="focused_linear", mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5)),
              f"FLatten-PVTv2-{_size.upper()} (Han et al., ICCV 2023): focused linear attention in all stages.")

