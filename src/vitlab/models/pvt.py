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
``shortcut``/``shortcut_init``, ``featscale`` (on every attention branch), ``init``.

State-dict keys: ``stages.{i}.patch_embed.{proj,norm}``, ``stages.{i}.pos_embed``,
``stages.{i}.blocks.{j}.{norm1, attn.q, attn.kv, attn.sr, attn.norm, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``cls_token``, ``norm``, ``head`` (timm has no PVT v1).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, PatchEmbed, TokenLayout, create_norm, init_weights
from vitlab.layers.inplace import activate
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.base import Intermediate, VitlabModel, make_default_cfg, register_recipe, tokens_to_map

__all__ = ["pvt_attention", "pvt_block", "MlpWithDepthwiseConv", "PvtStage", "PyramidVisionTransformer"]


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
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, groups=hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
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
              total_depth: int = 1, dwconv_mlp: bool = False) -> Block:
    """A PVT block (Wang et al., ICCV 2021): the one :class:`Block` with SRA and, for PVTv2, the
    convolutional FFN."""
    att = pvt_attention(spec, sr_ratio, linear_sr, norm, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
    hidden = int(dim * mlp_ratio)
    mlp = (MlpWithDepthwiseConv(dim, hidden, drop=drop, extra_relu=linear_sr) if dwconv_mlp
           else Mlp(dim, hidden, drop=drop))
    return Block(dim, spec.build(dim, num_heads, layout, **att), mlp, norm=norm, norm_eps=norm_eps,
                 branch_scale=shortcut, branch_scale_init=shortcut_init, total_depth=total_depth,
                 featscale=featscale, drop_path=drop_path)


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


class PvtStage(nn.Module):
    """One PVT stage: patch embedding (conv + norm), its own position embedding (with a class
    row when ``num_prefix``), then the blocks."""

    def __init__(self, img_size: Tuple[int, int], patch_size: int, in_chans: int, dim: int, depth: int,
                 num_prefix: int, norm: str, block_kwargs: Dict[str, Any], drop_paths: Sequence[float],
                 use_pos_embed: bool = True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim, norm_layer=create_norm(norm, dim, 1e-5))
        self.grid_size = self.patch_embed.grid_size
        self.num_prefix = num_prefix
        n = self.patch_embed.num_patches + num_prefix
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim)) if use_pos_embed else None
        self.layout = TokenLayout(self.grid_size, num_prefix)
        self.blocks = nn.ModuleList([pvt_block(dim, layout=self.layout, drop_path=drop_paths[j], **block_kwargs)
                                     for j in range(depth)])


class PyramidVisionTransformer(VitlabModel):
    """PVT v1 (Wang et al., ICCV 2021) whose parts are arguments; see the module docstring.

    ``global_pool='token'`` (PVT: class token in the last stage, final norm) or ``'avg'``
    (FLatten-PVT: no class token, mean of the last stage's tokens; ``final_norm`` defaults to
    False there, as the released FLatten code never applies its final norm).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (3, 4, 6, 3),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), qkv_bias: bool = True, mixer: str = "softmax",
                 norm: str = "layernorm", shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, init: str = "trunc_normal", global_pool: str = "token",
                 final_norm: Optional[bool] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, mixer_kwargs: Optional[Dict[str, Any]] = None,
                 core: Optional[str] = None, modifiers: Sequence[str] = (), branch_scale: Optional[str] = None,
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
        self.global_pool = global_pool
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}))
        self.num_prefix_tokens = 1 if global_pool == "token" else 0
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        stages, size, c_in, cur = [], (img, img), in_chans, 0
        for i in range(ns):
            bk = dict(num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i], qkv_bias=qkv_bias,
                      spec=spec, norm=norm, shortcut=branch_scale or shortcut, shortcut_init=shortcut_init,
                      featscale=featscale, drop=drop_rate, attn_drop=attn_drop_rate, norm_eps=norm_eps,
                      total_depth=sum(depths))
            prefix = self.num_prefix_tokens if i == ns - 1 else 0
            stage = PvtStage(size, patch_size if i == 0 else 2, c_in, embed_dims[i], depths[i], prefix, norm, bk,
                             dpr[cur:cur + depths[i]])
            stages.append(stage)
            size, c_in, cur = stage.grid_size, embed_dims[i], cur + depths[i]
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

    # -- the model contract ---------------------------------------------------------------
    def _stage_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        s = self.stages[i]
        x = s.patch_embed(x)
        if s.num_prefix:
            x = torch.cat([self.cls_token.repeat(x.shape[0], 1, 1), x], dim=1)
        return self.pos_drop(x + s.pos_embed)

    def _to_map(self, x: torch.Tensor, i: int) -> torch.Tensor:
        s = self.stages[i]
        return tokens_to_map(x[:, s.num_prefix:], s.grid_size)

    _global_pools = ("token", "avg")

    def _feature_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[TokenLayout]]:
        self.check_input(x)
        return x, None

    def _feature_units(self) -> Sequence[nn.Module]:
        return self.stages

    def _feature_unit(self, i: int, s: nn.Module, x: torch.Tensor, layout: Optional[TokenLayout]):
        """Stage ``i``: the previous stage's tokens as a map (the image for stage 0), its patch
        embedding, class token and position embedding, then its blocks; tokens ``(B, P + H*W, C)``."""
        x = self._stage_input(i, x if layout is None else layout.to_map(x))
        for blk in s.blocks:
            x = self._block(blk, x, s.layout)
        return x, s.layout

    def _truncate_units(self, n: int) -> None:
        self.stages = self.stages[:n]

    def _feature_info(self) -> List[Dict[str, Any]]:
        img = self.stages[0].patch_embed.img_size[0]
        return [dict(num_chs=s.pos_embed.shape[-1], reduction=img // s.grid_size[0], module=f"stages.{i}")
                for i, s in enumerate(self.stages)]

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The stem (stage 0's patch and position embeddings), then per stage its patch embedding
        with its first block (as timm groups Swin's patch merging), the class token with the last
        stage, the final norm last."""
        last = (len(self.stages) - 1, 0)
        if coarse:
            return dict(stem=r"^stages\.0\.(?:patch_embed|pos_embed)",
                        blocks=[(r"^stages\.(\d+)", None), (r"^cls_token", last[:1]), (r"^norm", (99999,))])
        return dict(stem=r"^stages\.0\.(?:patch_embed|pos_embed)", blocks=[
            (r"^stages\.(\d+)\.(?:patch_embed|pos_embed)", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^cls_token", last), (r"^norm", (99999,))])

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool != self.global_pool:
            raise ValueError(f"global_pool is fixed at construction for PVT (the class token and final norm depend "
                             f"on it): this model has {self.global_pool!r}, got {global_pool!r}")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """Per stage: the patch embedding (``embed`` for stage 0, ``downsample`` after), then every
        block's attention and MLP halves; last the final norm.  The class token is the prefix."""
        self.check_input(x)
        out: List[Intermediate] = []

        def entry(name, kind, t, i):
            p = self.stages[i].num_prefix
            out.append(Intermediate(name, kind, self._to_map(t, i), t[:, :p] if p else None, stage=i))

        for i, s in enumerate(self.stages):
            if i > 0:
                x = self._to_map(x, i - 1)
            x = self._stage_input(i, x)
            entry(f"stages.{i}.patch_embed", "embed" if i == 0 else "downsample", x, i)
            for j, blk in enumerate(s.blocks):
                x = blk.attn_half(x, s.layout)
                entry(f"stages.{i}.blocks.{j}.attn", "attn", x, i)
                x = blk.mlp_half(x, s.layout)
                entry(f"stages.{i}.blocks.{j}.mlp", "mlp", x, i)
        if not isinstance(self.norm, nn.Identity):
            entry("norm", "norm", self.norm(x), len(self.stages) - 1)
        return out

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
