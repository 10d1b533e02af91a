"""PVT: the Pyramid Vision Transformer with spatial-reduction attention, built from vitlab parts.

"Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions"
(Wang et al., ICCV 2021).  Four stages; each starts with a non-overlapping patch embedding
(patch 4, then 2: strided conv + LayerNorm) and a learned position embedding of its own, then
runs transformer blocks whose attention reduces the keys/values spatially (**SRA**: a strided
``sr_ratio x sr_ratio`` conv + LayerNorm on the key/value map).  The class token joins in the
last stage; the classifier reads it after the final norm.

This module also holds what PVTv2 (:mod:`vitlab.models.pvt_v2`) shares: the SRA attention
(:func:`pvt_attention`), the convolutional FFN (:class:`MlpWithDepthwiseConv`) and :func:`pvt_block`.

Parts: ``mixer`` (``softmax`` | ``attnscale`` | ``cosine``: SRA with that attention core;
``focused_linear``: FLatten's focused linear attention over *all* tokens -- as in "FLatten
Transformer" (Han et al., ICCV 2023) the key reduction is disabled for it, spec ``flatten.md``
section 5), ``norm`` (every LayerNorm: blocks, patch embeddings, SR norms, final norm),
``shortcut``/``shortcut_init``, ``featscale`` (on every attention branch), ``init``, ``core`` / ``modifiers`` /
``attn_position`` (``("rope",)`` is refused where ``sr_ratio > 1``: a query is not a key of the reduced map).

State-dict keys: ``patch_embed.{proj,norm}`` (the stem), ``stages.{i}.downsample.{proj,norm}`` (the
patch embeddings of stages 2-4), ``stages.{i}.pos_embed``,
``stages.{i}.blocks.{j}.{norm1, attn.q, attn.kv, attn.sr, attn.norm, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``cls_token``, ``norm``, ``head`` (timm has no PVT v1).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, PatchEmbed, TokenLayout, create_norm, init_weights
from vitlab.layers.inplace import activate
from vitlab.layers.linear import Linear
from vitlab.models.backbone import Backbone, Stage
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.base import make_default_cfg, register_recipe

__all__ = ["pvt_attention", "pvt_block", "MlpWithDepthwiseConv", "PvtPatchEmbed", "PyramidVisionTransformer"]


def pvt_attention(spec: MixerSpec, sr_ratio: int, linear_sr: bool, norm: str, **attention: Any) -> Dict[str, Any]:
    """What PVT asks of a block's attention: queries from every token, keys and values from the
    spatially reduced map (SRA, Wang et al., ICCV 2021; PVTv2's linear SRA), projections ``q`` and
    ``kv`` as timm's.  A linear-cost core attends over all tokens without reduction, as in "FLatten
    Transformer" (Han et al., ICCV 2023; spec ``flatten.md`` section 5).  A non-attention mixer takes
    none of it."""
    if not spec.attention:
        return {}
    if spec.linear_cost:
        return dict(attention)
    return dict(attention, projection="q_kv",
                grouping=("spatial_reduction", dict(sr_ratio=sr_ratio, linear=linear_sr, norm=norm)))


class MlpWithDepthwiseConv(nn.Module):
    """PVTv2's convolutional FFN: ``fc1 -> [ReLU] -> 3x3 depthwise conv -> GELU -> fc2`` on the
    token map ("PVT v2: Improved Baselines with Pyramid Vision Transformer", Wang et al., CVMJ
    2022).  ``extra_relu`` is the linear-SRA variant's ReLU.  Names match timm's."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, extra_relu: bool = False):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, groups=hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if layout.num_prefix:
            raise ValueError("the convolutional FFN of PVTv2 cannot take prefix (class) tokens")
        hw = layout.hw
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(activate(self.relu, x.transpose(1, 2).reshape(b, c, hw[0], hw[1]), self.fc1))
        # without autograd, the activations overwrite their inputs (vitlab.layers.inplace)
        return self.drop(self.fc2(self.drop(activate(self.act, x.flatten(2).transpose(1, 2), self.dwconv))))


def pvt_block(dim: int, num_heads: int, layout: TokenLayout, spec: MixerSpec, mlp_ratio: float = 4.0,
              sr_ratio: int = 1, linear_sr: bool = False, qkv_bias: bool = True, norm: str = "layernorm",
              shortcut: str = "plain", shortcut_init: Optional[float] = None, featscale: bool = False,
              drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
              total_depth: int = 1, dwconv_mlp: bool = False, wiring: str = "pre") -> Block:
    """A PVT block (Wang et al., ICCV 2021): the one :class:`Block` with SRA and, for PVTv2, the
    convolutional FFN."""
    att = pvt_attention(spec, sr_ratio, linear_sr, norm, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
    hidden = int(dim * mlp_ratio)
    mlp = (MlpWithDepthwiseConv(dim, hidden, drop=drop, extra_relu=linear_sr) if dwconv_mlp
           else Mlp(dim, hidden, drop=drop))
    return Block(dim, spec.build(dim, num_heads, layout, **att), mlp, norm=norm, norm_eps=norm_eps,
                 branch_scale=shortcut, branch_scale_init=shortcut_init, total_depth=total_depth,
                 featscale=featscale, drop_path=drop_path, wiring=wiring)


def _as_tuple(v: Any, n: int, what: str) -> Tuple[Any, ...]:
    t = tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    if len(t) != n:
        raise ValueError(f"{what} needs {n} values (one per stage), got {len(t)}: {t}")
    return t


def stage_sizes(depths, embed_dims, num_heads, mlp_ratios, sr_ratios, drop_path_rate: float) -> Tuple[tuple, ...]:
    """PVT's per-stage sizes as tuples of one value per stage, with one clear error per bad value."""
    depths = tuple(depths)
    ns = len(depths)
    if ns < 1 or any(d < 1 for d in depths):
        raise ValueError(f"depths must be positive stage depths, got {depths}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    return (depths, _as_tuple(embed_dims, ns, "embed_dims"), _as_tuple(num_heads, ns, "num_heads"),
            _as_tuple(mlp_ratios, ns, "mlp_ratios"), _as_tuple(sr_ratios, ns, "sr_ratios"))


class PvtPatchEmbed(PatchEmbed):
    """PVT's patch embedding of stages 2-4 (strided conv + norm) on the previous stage's tokens."""

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, Tuple[int, int]]:
        return super().forward(layout.to_map(x)), self.grid_size


class PyramidVisionTransformer(Backbone):
    """PVT v1 (Wang et al., ICCV 2021) whose parts are arguments; see the module docstring.

    ``global_pool='token'`` (PVT: class token in the last stage, final norm) or ``'avg'``
    (FLatten-PVT: no class token, mean of the last stage's tokens; ``final_norm`` defaults to
    False there, as the released FLatten code never applies its final norm).
    """

    prefix_names = ("cls_token",)

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, mixer: str = "softmax",
                 norm: str = "layernorm", shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, init: str = "trunc_normal", wiring: str = "pre", global_pool: str = "token",
                 final_norm: Optional[bool] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, mixer_kwargs: Optional[Dict[str, Any]] = None,
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 branch_scale: Optional[str] = None,
                 architecture: str = "pvt", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        depths, embed_dims, num_heads, mlp_ratios, sr_ratios = stage_sizes(depths, embed_dims, num_heads, mlp_ratios,
                                                                           sr_ratios, drop_path_rate)
        ns = len(depths)
        img = img_size if isinstance(img_size, int) else img_size[0]
        total_stride = patch_size * 2 ** (ns - 1)
        if img % total_stride:
            raise ValueError(f"img_size {img} must be divisible by {total_stride} (patch {patch_size}, then "
                             f"{ns - 1} stride-2 stages)")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.embed_dim = embed_dims[-1]
        self.global_pool, self.token_stage = global_pool, ns - 1  # the class token joins the last stage
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.patch_embed = PatchEmbed(img, patch_size, in_chans, embed_dims[0],
                                      norm_layer=create_norm(norm, embed_dims[0], 1e-5))
        grid, cur, stages = self.patch_embed.grid_size, 0, []
        for i in range(ns):
            bk = dict(num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i], qkv_bias=qkv_bias,
                      spec=spec, norm=norm, shortcut=branch_scale or shortcut, shortcut_init=shortcut_init,
                      featscale=featscale, drop=drop_rate, attn_drop=attn_drop_rate, norm_eps=norm_eps, wiring=wiring,
                      total_depth=sum(depths))
            down = None if i == 0 else PvtPatchEmbed(grid, 2, embed_dims[i - 1], embed_dims[i],
                                                     norm_layer=create_norm(norm, embed_dims[i], 1e-5))
            grid = down.grid_size if down is not None else grid
            layout = TokenLayout(grid, int(global_pool == "token" and i == ns - 1))
            blocks = [pvt_block(embed_dims[i], layout=layout, drop_path=dpr[cur + j], **bk) for j in range(depths[i])]
            stages.append(Stage(blocks, embed_dims[i], img // grid[0], grid, downsample=down,
                                pos_tokens=layout.num_tokens))
            cur += depths[i]
        self.stages = nn.ModuleList(stages)
        self.pos_drop = nn.Dropout(drop_rate)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1])) if global_pool == "token" else None
        use_final_norm = (global_pool == "token") if final_norm is None else final_norm
        self.norm = create_norm(norm, embed_dims[-1], eps=norm_eps) if use_final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        with torch.no_grad():
            for s in self.stages:
                nn.init.trunc_normal_(s.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.trunc_normal_(self.cls_token, std=0.02)
            init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The stem (patch embedding, stage 0's position table), then per stage its patch embedding and
        position table with its first block (as timm groups Swin's patch merging), the class token
        with the last stage, the final norm last."""
        last = (len(self.stages) - 1, 0)
        stem = r"^patch_embed|^stages\.0\.pos_embed"
        if coarse:
            return dict(stem=stem, blocks=[(r"^stages\.(\d+)", None), (r"^cls_token", last[:1]), (r"^norm", (99999,))])
        return dict(stem=stem, blocks=[
            (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^cls_token", last), (r"^norm", (99999,))])

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool != self.global_pool:
            raise ValueError(f"global_pool is fixed at construction for PVT (the class token and final norm depend "
                             f"on it): this model has {self.global_pool!r}, got {global_pool!r}")

# -- registered recipes ---------------------------------------------------------------------------
_PVT_SIZES = {
    "tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3),
}
_PVT_COMMON = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                   sr_ratios=(8, 4, 2, 1), qkv_bias=True)
_FLATTEN = dict(mixer="focused_linear", global_pool="avg", mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5))


def _register(name: str, defaults: Dict[str, Any], doc: str) -> None:
    register_recipe(PyramidVisionTransformer, name, defaults, doc, crop_pct=0.9)


for _size, _depths in _PVT_SIZES.items():
    _register(f"pvt_{_size}", dict(_PVT_COMMON, depths=_depths),
              f"PVT-{_size.capitalize()} (Wang et al., ICCV 2021): depths {_depths}.")
    # FLatten-PVT (Han et al., ICCV 2023): focused linear attention in every block, no key reduction,
    # mean pooling; drop path 0.1 (T/S) or 0.3 (M/L) in the paper's recipe (pass drop_path_rate=)
    _register(f"flatten_pvt_{_size}", dict(_PVT_COMMON, depths=_depths, **_FLATTEN),
              f"FLatten-PVT-{_size[0].upper()} (Han et al., ICCV 2023): PVT-{_size.capitalize()} sizes with "
              f"focused linear attention (p=3, DWC k=5) in all stages.")
