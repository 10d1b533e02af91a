"""The isotropic Vision Transformer, built from vitlab parts.

"An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale" (Dosovitskiy
et al., ICLR 2021) and DeiT ("Training data-efficient image transformers & distillation through
attention", Touvron et al., ICML 2021).  Every part is an argument: ``mixer``, ``norm``,
``shortcut``, ``featscale``, ``init``, ``pos_embed``, ``embed``, ``global_pool``.

State-dict keys follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.ls1.gamma``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``/``fc2``, ``norm``,
``fc_norm``, ``attn_pool`` (MAP head), ``head``); vitlab-only parts add ``blocks.{i}.featscale.{s,t}``,
``blocks.{i}.attn.attn_scale.omega``, ``blocks.{i}.conv_units.{0,1}.*``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import EMBEDS, MixerSpec, TokenLayout, create_norm, init_weights, sincos_1d, sincos_2d
from vitlab.layers.mlp import CHANNEL_MIXERS
from vitlab.layers.token_ops import AdaptiveTokenSampler, PatchDropout, PatchMerger, TokenSubset
from vitlab.layers.attention_pool import AttentionPool
from vitlab.layers.pos_embed import POS_EMBEDS, sincos_2d_big_vision
from vitlab.models.backbone import Backbone
from vitlab.models.block import Block, drop_path_rates
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.registry import check_kwargs

__all__ = ["Block", "VisionTransformer"]  # Block re-exported from vitlab.models.block


class VisionTransformer(Backbone):
    """Isotropic ViT whose every part is an argument (see the module docstring).

    Args (beyond the usual ViT sizes): ``mixer`` (``softmax`` | ``cosine`` | ``focused_linear``
    | ``attnscale``), ``norm`` (``layernorm`` | ``center`` | ``rms``), ``shortcut`` (``plain`` |
    ``weighted`` | ``layerscale``; ``shortcut_init`` overrides its init), ``featscale``
    (bool), ``init`` (``trunc_normal`` | ``xavier`` | ``spectral``), ``pos_embed`` (``learned``
    | ``sincos`` | ``sincos_1d`` | ``none``), ``embed`` (``patch`` | ``conv`` | ``t2t`` | ``cct``; ``embed_kwargs``
    go to it), ``global_pool`` (``token`` | ``avg`` | ``seqpool``: CCT's sequence pooling | ``map``: attention pooling
    of the patch tokens, timm's ``AttentionPoolLatent``), ``class_token``,
    ``reg_tokens`` (register tokens, Darcet et al., ICLR 2024), ``no_embed_class``
    (the position table covers the patches only, added before the prefix tokens join: DeiT III, registers),
    ``post_norm`` (alias of ``wiring="post"``), ``wiring`` (``pre`` | ``post`` |
    ``end`` | ``parallel``), ``num_parallel`` (blocks of that many parallel attention and MLP branches, Touvron
    et al., ECCV 2022), ``mlp`` (a :data:`~vitlab.layers.mlp.CHANNEL_MIXERS` name: ``mlp`` | ``localvit``),
    ``block_modifiers`` (``{block index: modifiers}`` added to those blocks only, negative indices from the end),
    ``block_mixers`` (``{block index: dict(mixer=, core=, modifiers=, mixer_kwargs=, attn_position=)}``: those blocks'
    token mixer, the model's with these fields replaced; hybrid models),
    ``attn_position`` (attention position parts in every block, e.g. ``("rope",)``), ``conv_units``,
    ``mixer_kwargs``, ``dynamic_img_size`` (any
    input size divisible by the patch; the position table is resampled on the fly, as timm's). ``patch_drop_rate``
    (timm's PatchDropout in training, Liu et al., WACV 2023), ``patch_merger`` (``dict(after=k, num_tokens=M)``:
    a :class:`~vitlab.layers.token_ops.PatchMerger` after block ``k``, Renggli et al., 2022), ``ats``
    (``dict(blocks=(i, ...), max_tokens=K)``: adaptive token sampling inside those blocks, Fayyaz et al., ECCV 2022;
    see :func:`_ats_layouts` and :mod:`vitlab.models.ats`).
    """

    stage_attr = "blocks"  # isotropic: one stage, every block a feature tap
    prefix_names = ("cls_token", "reg_token")

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, mixer: str = "softmax", norm: str = "layernorm", shortcut: str = "plain",
                 shortcut_init: Optional[float] = None, featscale: bool = False, init: str = "trunc_normal",
                 pos_embed: str = "learned", embed: str = "patch", global_pool: str = "token",
                 class_token: bool = True, fc_norm: Optional[bool] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 post_norm: bool = False, wiring: Optional[str] = None, conv_units: bool = False,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, core: Optional[str] = None,
                 modifiers: Sequence[str] = (), branch_scale: Optional[str] = None, extra_tokens: int = 0,
                 reg_tokens: int = 0, no_embed_class: bool = False, dynamic_img_size: bool = False,
                 num_parallel: int = 1, mlp: str = "mlp", block_modifiers: Optional[Dict[int, Any]] = None,
                 embed_kwargs: Optional[Dict[str, Any]] = None, attn_position: Sequence[Any] = (),
                 patch_drop_rate: float = 0.0, patch_merger: Optional[Dict[str, Any]] = None,
                 ats: Optional[Dict[str, Any]] = None, block_mixers: Optional[Dict[int, Dict[str, Any]]] = None,
                 architecture: str = "vit", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if global_pool not in ("token", "avg", "seqpool", "map"):
            raise ValueError(f"global_pool must be 'token', 'avg', 'seqpool' or 'map', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; valid: {', '.join(POS_EMBEDS)}")
        if depth < 1 or embed_dim < 1 or num_heads < 1:
            raise ValueError(f"depth, embed_dim and num_heads must be positive, got {depth}, {embed_dim}, {num_heads}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.embed_dim = embed_dim
        self.global_pool, self.no_embed_class = global_pool, no_embed_class
        num_prefix = int(class_token) + reg_tokens + extra_tokens  # extra: prefix tokens a subclass adds
        specs = _block_specs(MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position),
                             block_mixers, depth)
        self.patch_embed = EMBEDS.get(embed)(img_size, patch_size, in_chans, embed_dim,
                                             dynamic_img_size=dynamic_img_size, **(embed_kwargs or {}))
        self.grid_size = self.patch_embed.grid_size
        self.stem_reduction = patch_size if isinstance(patch_size, int) else patch_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self._position_table(pos_embed, 0 if no_embed_class else num_prefix, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        layout = TokenLayout(self.grid_size, num_prefix)
        layouts = self._token_count_parts(patch_drop_rate, patch_merger, layout, depth, specs, norm, norm_eps, ats)
        self.blocks = self._build_blocks(
            specs, layouts, num_heads, mlp, int(embed_dim * mlp_ratio), num_parallel,
            _block_attention(block_modifiers, depth),
            dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate),
            dict(norm=norm, norm_eps=norm_eps, wiring=wiring or ("post" if post_norm else "pre"),
                 branch_scale=branch_scale or shortcut, branch_scale_init=shortcut_init, total_depth=depth,
                 featscale=featscale, conv_units=conv_units), drop_rate, drop_path_rate)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = create_norm(norm, embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        self.fc_norm = create_norm(norm, embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.attention_pool = nn.Linear(embed_dim, 1) if global_pool == "seqpool" else None  # CCT's g(x_L)
        self.attn_pool = AttentionPool(embed_dim, num_heads, mlp_ratio, norm, norm_eps) if global_pool == "map" \
            else None  # MAP head
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.patch_embed.img_size[0], num_classes,
                                                           in_chans)

    def _build_blocks(self, specs: List[MixerSpec], layouts: List[TokenLayout], heads: int, mlp: str, hidden: int,
                      num_parallel: int, per_block: List[Dict[str, Any]], attn_kw: Dict[str, Any],
                      block_kw: Dict[str, Any], drop_rate: float, drop_path_rate: float) -> nn.Sequential:
        """The blocks: block ``i`` built for ``layouts[i]`` with the attention parts ``per_block[i]`` on top of
        ``attn_kw``; ``num_parallel > 1`` gives each block that many attention and MLP branches."""
        if num_parallel < 1:
            raise ValueError(f"num_parallel must be >= 1, got {num_parallel}")
        dim = self.embed_dim
        many = (lambda make: [make() for _ in range(num_parallel)]) if num_parallel > 1 else (lambda make: make())
        dpr = drop_path_rates(drop_path_rate, len(layouts))
        return nn.Sequential(*[
            Block(dim, many(lambda: specs[i].build(dim, heads, layouts[i], **attn_kw, **per_block[i])),
                  many(lambda: CHANNEL_MIXERS.get(mlp)(dim, hidden, drop=drop_rate)), drop_path=dpr[i], **block_kw)
            for i in range(len(layouts))])

    def _position_table(self, kind: str, num_prefix: int, dim: int) -> None:
        """``pos_embed``: learned ``(1, P + h*w, dim)``, fixed 2-D sin-cos (zero prefix rows) or None."""
        self.pos_embed_type = kind
        if kind == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + num_prefix, dim))
        elif kind == "sincos":
            table = torch.cat([torch.zeros(num_prefix, dim), sincos_2d(self.grid_size, dim)])
            self.register_buffer("pos_embed", table[None], persistent=False)
        elif kind == "sincos_big_vision":  # SimpleViT (Beyer et al., 2022): big_vision's frequencies
            table = torch.cat([torch.zeros(num_prefix, dim), sincos_2d_big_vision(self.grid_size, dim)])
            self.register_buffer("pos_embed", table[None], persistent=False)
        elif kind == "sincos_1d":  # T2T-ViT, CCT 'sine': one sinusoid row per token, prefix tokens included
            table = sincos_1d(self.patch_embed.num_patches + num_prefix, dim)
            self.register_buffer("pos_embed", table[None], persistent=False)
        else:
            self.pos_embed = None

    @torch.no_grad()
    @torch.no_grad()
    def init_prefix_tokens(self, std: float) -> None:
        """Class and register tokens ~ N(0, std) cut at +-2 (timm's ``trunc_normal_``; timm's ViT: N(0, 1e-6))."""
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.trunc_normal_(tok, std=std)

    def _init_weights(self, init: str) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=1e-6)
        init_weights(self, init)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.embed_dim ** -0.5)  # timm's MAP latent

    def _token_count_parts(self, patch_drop_rate: float, patch_merger: Optional[Dict[str, Any]],
                           layout: TokenLayout, depth: int, specs: List[MixerSpec], norm: str, eps: float,
                           ats: Optional[Dict[str, Any]] = None) -> List[TokenLayout]:
        """``patch_drop`` (timm's name and module), the optional ``patch_merger`` (run after block
        ``after_block``) and the optional adaptive token samplers ``ats`` (run inside the blocks ``in_block``);
        returns the layout each block is built for."""
        if not 0.0 <= patch_drop_rate < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {patch_drop_rate}")
        spec = next((s for s in specs if s.linear_cost), specs[0])  # a block with FLatten's DWC, if any
        if (patch_drop_rate or patch_merger or ats is not None) and spec.linear_cost:  # FLatten's DWC: the map
            raise ValueError(f"mixer {spec.mixer!r} (core {spec.core or spec.mixer!r}) convolves the token map, which "
                             "patch_drop_rate / patch_merger / ats take away; use a softmax-family mixer")
        if ats is not None:
            if patch_merger is not None or self.cls_token is None or self.global_pool != "token":
                raise ValueError("ats (adaptive token sampling) scores tokens by the class token's attention and "
                                 "pools that token: it needs class_token=True, global_pool='token' and no "
                                 f"patch_merger; got class_token={self.cls_token is not None}, "
                                 f"global_pool={self.global_pool!r}, patch_merger={patch_merger!r}")
            per_block, layouts = _ats_layouts(ats, layout, depth)
            self.ats = nn.ModuleList([AdaptiveTokenSampler(k - layout.num_prefix) for k in per_block.values()])
            self.in_block = {i: f"ats.{n}" for n, i in enumerate(per_block)}
            return layouts
        self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=layout.num_prefix) if patch_drop_rate \
            else nn.Identity()
        merge_after, layouts = _merger_layouts(patch_merger, layout, depth)
        if patch_merger is not None:
            self.patch_merger = PatchMerger(self.embed_dim, norm=norm, norm_eps=eps,
                                            **{k: v for k, v in patch_merger.items() if k != "after"})
            self.after_block = {merge_after: "patch_merger"}
        return layouts

    _global_pools = ("token", "avg", "seqpool", "map")

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool == "map" and self.attn_pool is None:
            raise ValueError("global_pool='map' needs the attention-pooling head (attn_pool); build the model with "
                             "global_pool='map'")
        super()._set_global_pool(global_pool)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "map":  # MAP head (big_vision, timm's AttentionPoolLatent): the patch tokens only
            x = x[:, self.num_prefix_tokens:]
            return self.attn_pool(x, x.new_zeros(x.shape[:2], dtype=torch.long), 1)[:, 0]
        return super()._pool(x)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        groups = super().group_matcher(coarse)
        if self.after_block:  # a PatchMerger joins the group of the block it follows
            groups["blocks"] = [(r"^patch_merger", (next(iter(self.after_block)),))] + groups["blocks"]
        return groups

def _merger_layouts(cfg: Optional[Dict[str, Any]], layout: TokenLayout, depth: int):
    """``patch_merger=dict(after=k, num_tokens=M)`` (Renggli et al., 2022: ViT-B/16 merges to 8 tokens
    halfway, the default ``after``): the index of the block it follows and the layout each block is built
    for (blocks after it see ``M`` tokens without a map, so grid parts refuse at build time)."""
    if cfg is None:
        return None, [layout] * depth
    check_kwargs("patch_merger", cfg, ("after", "num_tokens"))
    after = int(cfg.get("after", depth // 2))
    if not 1 <= after < depth:
        raise ValueError(f"patch_merger after={after} must be in 1..{depth - 1}: the number of blocks before it")
    merged = TokenSubset.of(layout.num_prefix + int(cfg.get("num_tokens", 8)), layout.num_prefix, "a PatchMerger",
                            layout.grid)
    return after - 1, [layout if i < after else merged for i in range(depth)]


def _ats_layouts(cfg: Dict[str, Any], layout: TokenLayout, depth: int) -> Tuple[Dict[int, int], List[TokenLayout]]:
    """``ats=dict(blocks=(i, ...), max_tokens=K)`` ("Adaptive Token Sampler for Efficient Vision Transformers",
    Fayyaz et al., ECCV 2022, sec. 4.1: DeiT-S samples in its blocks 4-12, at most ``K = 197`` tokens, the class
    token included): ``{block index: K}`` (``max_tokens`` one int or one per block; default: all the tokens, the
    paper's ``K = N``, which still drops tokens as repeated samples count once) and the layout each block is built
    for (blocks after the first sampling one see at most ``K`` tokens without a map).  ``blocks`` default: the
    last three quarters, ``depth // 4 ..`` (indices 3..11 of DeiT-S's 12); negative indices count from the end."""
    check_kwargs("ats", cfg, ("blocks", "max_tokens"))
    given = [int(i) for i in cfg.get("blocks", range(depth // 4, depth))]
    blocks = [i % depth for i in given]
    if not blocks or any(not -depth <= i < depth for i in given) or len(set(blocks)) < len(blocks):
        raise ValueError(f"ats blocks {given} must be distinct block indices in -{depth}..{depth - 1}, at least one")
    k = cfg.get("max_tokens", layout.num_tokens)
    ks = [int(t) for t in k] if isinstance(k, (list, tuple)) else [int(k)] * len(blocks)
    if len(ks) != len(blocks) or min(ks) <= layout.num_prefix:
        raise ValueError(f"ats max_tokens={k!r} must be one int or one per block ({len(blocks)}), each more than the "
                         f"{layout.num_prefix} prefix token(s)")
    per_block = dict(sorted(zip(blocks, ks)))
    sampled = TokenSubset.of(min(max(ks), layout.num_tokens), layout.num_prefix, "adaptive token sampling",
                             layout.grid)
    return per_block, [layout if i <= min(blocks) else sampled for i in range(depth)]


def _block_specs(spec: MixerSpec, block_mixers: Optional[Dict[int, Dict[str, Any]]], depth: int) -> List[MixerSpec]:
    """Per block, the token mixer: the model's, or for the blocks in ``block_mixers`` (``{block index: dict(mixer=,
    core=, modifiers=, mixer_kwargs=, attn_position=)}``, negative indices from the end) the model's with those
    fields replaced: hybrid models such as linear attention early and softmax late (every part stays available)."""
    specs = [spec] * depth
    for index, override in (block_mixers or {}).items():
        if not -depth <= int(index) < depth:
            raise ValueError(f"block_mixers index {index} is out of range for depth {depth} "
                             f"(valid: -{depth}..{depth - 1})")
        check_kwargs(f"block_mixers[{index}]", override,
                     ("mixer", "core", "modifiers", "mixer_kwargs", "attn_position"))
        fields = dict(mixer=spec.mixer, core=spec.core, modifiers=tuple(spec.modifiers), kwargs=dict(spec.kwargs),
                      position=tuple(spec.position))
        renamed = {"mixer_kwargs": "kwargs", "attn_position": "position"}
        fields.update({renamed.get(k, k): v for k, v in override.items()})
        specs[int(index)] = MixerSpec(**fields)
    return specs


def _block_attention(block_modifiers: Optional[Dict[int, Any]], depth: int) -> List[Dict[str, Any]]:
    """Per block, the attention parts beyond the mixer spec: ``block_modifiers`` ``{block index: modifier
    specs}`` (negative indices count from the end; DeepViT's re-attention in the last blocks only)."""
    per: List[Dict[str, Any]] = [{} for _ in range(depth)]
    for index, mods in (block_modifiers or {}).items():
        if not -depth <= int(index) < depth:
            raise ValueError(f"block_modifiers index {index} is out of range for depth {depth} "
                             f"(valid: -{depth}..{depth - 1})")
        per[int(index)]["modifiers"] = (mods,) if isinstance(mods, str) else tuple(mods)  # names or (name, kwargs)
    return per

# -- registered recipes -------------------------------------------------------------------------

from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD  # noqa: E402


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "medium": dict(embed_dim=512, depth=12, num_heads=8),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _register_vit(name: str, size: str, patch: int, img: int, extra: Optional[Dict[str, Any]] = None, **cfg: Any):
    defaults = dict(_SIZES[size], patch_size=patch, img_size=img, **(extra or {}))
    register_recipe(VisionTransformer, name, defaults, f"{name}: ViT-{size[0].upper()}/{patch} at {img}x{img} "
                    f"({defaults}).", **cfg)


# ViT (Dosovitskiy et al., 2021) and DeiT (Touvron et al., 2021): same sizes and names as timm.
for _size in ("tiny", "small", "base", "large"):
    _register_vit(f"vit_{_size}_patch16_224", _size, 16, 224)
_register_vit("vit_base_patch32_224", "base", 32, 224)
_register_vit("vit_small_patch32_224", "small", 32, 224)
_register_vit("vit_base_patch16_384", "base", 16, 384, crop_pct=1.0)
for _size in ("tiny", "small", "base"):
    _register_vit(f"deit_{_size}_patch16_224", _size, 16, 224)
# small-image configs: CIFAR (32x32, 10 classes) and MNIST-size (28x28, 1 channel, 10 classes)
for _size in ("tiny", "small"):
    _register_vit(f"vit_{_size}_patch4_32", _size, 4, 32, dict(num_classes=10), mean=CIFAR10_MEAN, std=CIFAR10_STD,
                  crop_pct=1.0)
    _register_vit(f"vit_{_size}_patch4_28", _size, 4, 28, dict(num_classes=10, in_chans=1), mean=MNIST_MEAN,
                  std=MNIST_STD, crop_pct=1.0)
# ViT-Ti of "How Do Vision Transformers Work?" (Park & Kim, ICLR 2022): patch 2, no qkv bias
_register_vit("vit_tiny_patch2_32", "tiny", 2, 32, dict(num_classes=10, qkv_bias=False), mean=CIFAR10_MEAN,
              std=CIFAR10_STD, crop_pct=1.0)

# Anti-oversmoothing (Wang et al., ICLR 2022): DeiT-S with 12 or 24 blocks + AttnScale / FeatScale
for _depth in (12, 24):
    _register_vit(f"attnscale_small_{_depth}", "small", 16, 224, dict(depth=_depth, mixer="attnscale"))
    _register_vit(f"featscale_small_{_depth}", "small", 16, 224, dict(depth=_depth, featscale=True))
    _register_vit(f"deit_small_{_depth}_patch16_224", "small", 16, 224, dict(depth=_depth)) if _depth == 24 else None

# LipsFormer (Qi et al., ICLR 2023) parts on DeiT-S: cosine attention (tau 10), CenterNorm,
# weighted shortcut (alpha 1/L), spectral init, post-norm blocks with the depthwise-conv units.
_register_vit("lipsformer_vit_small", "small", 16, 224,
              dict(mixer="cosine", norm="center", shortcut="weighted", init="spectral", post_norm=True,
                   conv_units=True, mixer_kwargs=dict(tau=10.0)))
_register_vit("lipsformer_vit_tiny_patch4_32", "tiny", 4, 32,
              dict(num_classes=10, mixer="cosine", norm="center", shortcut="weighted", init="spectral",
                   post_norm=True, conv_units=True, mixer_kwargs=dict(tau=10.0)),
              mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)
# FLatten (Han et al., ICCV 2023): focused linear attention (p=3, DWC k=5) in every block
_register_vit("flatten_vit_small", "small", 16, 224,
              dict(mixer="focused_linear", mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5)))
_register_vit("flatten_deit_tiny", "tiny", 16, 224,
              dict(mixer="focused_linear", mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5)))

# DeiT III ("DeiT III: Revenge of the ViT", Touvron et al., ECCV 2022): LayerScale (1e-6) ViTs whose
# position table covers the patches only (timm's deit3_* names and sizes)
_DEIT3 = dict(branch_scale="layerscale", shortcut_init=1e-6, no_embed_class=True)
for _size, _imgs in (("small", (224, 384)), ("medium", (224,)), ("base", (224, 384)), ("large", (224, 384))):
    for _img in _imgs:
        _register_vit(f"deit3_{_size}_patch16_{_img}", _size, 16, _img, _DEIT3,
                      **({"crop_pct": 1.0} if _img > 224 else {}))
_register_vit("deit3_huge_patch14_224", "huge", 14, 224, _DEIT3)
# Registers ("Vision Transformers Need Registers", Darcet et al., ICLR 2024): 4 register tokens after the
# class token, position table on the patches only (timm's names; the DINOv2 ones are feature
# extractors without a classifier, num_classes=0, as in timm)
_DINOV2_REG = dict(reg_tokens=4, no_embed_class=True, branch_scale="layerscale", shortcut_init=1e-5, num_classes=0)
for _size in ("small", "base"):
    _register_vit(f"vit_{_size}_patch14_reg4_dinov2", _size, 14, 518, _DINOV2_REG, crop_pct=1.0)
_register_vit("vit_base_patch16_reg4_gap_256", "base", 16, 256,
              dict(reg_tokens=4, no_embed_class=True, class_token=False, global_pool="avg"), crop_pct=0.9,
              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm's data config for this name
# Parallel blocks ("Three things everyone should know about Vision Transformers", Touvron et al., ECCV 2022,
# sec. 3): 18 blocks of 2 parallel attention + 2 parallel MLP branches, LayerScale 1e-5 (timm's names)
for _size in ("small", "base"):
    _register_vit(f"vit_{_size}_patch16_18x2_224", _size, 16, 224,
                  dict(depth=18, num_parallel=2, branch_scale="layerscale", shortcut_init=1e-5))
# timm's other vit_*_reg* recipes have their own file (vit.py stays under 400 lines); imported last, as they need
# VisionTransformer, and here because the families load by module (factory.FAMILIES) while vitlab.models stays lazy
from vitlab.models import vit_registers as _vit_registers  # noqa: E402,F401
