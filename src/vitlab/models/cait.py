"""CaiT: Class-Attention in Image Transformers, built from vitlab parts.

"Going deeper with Image Transformers" (Touvron et al., ICCV 2021).  Three ideas on top of a ViT:

* **LayerScale**: every residual branch is multiplied by a learnable per-channel vector
  initialised to a small value (1e-5 for depth 24, 1e-6 for deeper models); in vitlab this is
  the ``layerscale`` shortcut part (``shortcut=`` / ``shortcut_init=`` override it).
* **Talking-heads attention** ("Talking-Heads Attention", Shazeer et al., 2020): a learned
  ``heads x heads`` linear map mixes the heads' logits before the softmax (``proj_l``) and
  the probabilities after it (``proj_w``).  It needs the explicit probability matrix, so it
  exists for the mixers that form one: ``softmax``, ``attnscale`` (AttnScale applied after
  ``proj_w``, as in "Anti-Oversmoothing in Deep Vision Transformers", Wang et al., ICLR 2022)
  and ``cosine``.  ``focused_linear`` never forms the N x N matrix, so combining it with
  talking heads raises; pass ``talking_heads=False`` to use it (or any other mixer) as a
  plain mixer in the self-attention blocks.
* **Class attention**: the class token is inserted only after the self-attention stage
  (patch tokens only, position embedding without a class row); two class-attention blocks
  then update the class token alone (query = class token, keys/values = class + patches).
  ``ca_mixer`` picks their attention (``softmax`` or ``cosine``; default: ``cosine`` when
  ``mixer='cosine'``, else ``softmax`` -- AttnScale and FeatScale are not applied there, as
  in the paper's code).

``featscale=True`` adds FeatScale on every self-attention branch (before LayerScale).
Stochastic depth uses the same rate in every self-attention block (CaiT's rule).

State-dict keys follow timm's ``Cait`` except that LayerScale vectors are ``ls1.gamma`` /
``ls2.gamma`` (timm: ``gamma_1`` / ``gamma_2``); :mod:`vitlab.interop.timm_cait` renames them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, PatchEmbed, TokenLayout, create_norm, init_weights
from vitlab.models.backbone import Backbone
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block

__all__ = ["Cait"]


class Cait(Backbone):
    """CaiT (Touvron et al., ICCV 2021) whose parts are arguments; see the module docstring.

    Args beyond the ViT sizes: ``mixer``, ``talking_heads`` (bool, default True), ``ca_mixer``,
    ``norm``, ``shortcut`` (default ``layerscale``), ``shortcut_init`` (init of the shortcut part; default: ``layerscale_init`` = 1e-5
    for ``layerscale``, the part's own default otherwise),
    ``featscale``, ``init``, ``depth_token_only`` (class-attention blocks, 2),
    ``mlp_ratio_token_only``, ``mixer_kwargs`` (passed to the self-attention mixer), ``dynamic_img_size``,
    ``wiring`` (of the self-attention blocks), ``core`` / ``modifiers`` / ``attn_position`` (position parts such
    as ``("rope",)``; the self-attention blocks only, as the modifiers: class attention's class-token queries
    are not keys).
    """

    stage_attr, tail_attr = "blocks", "blocks_token_only"  # feature taps: the self-attention blocks
    prefix_names, token_stage = ("cls_token",), 1  # the class token joins the class-attention blocks
    global_pool, _global_pools = "token", ("token",)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 24, num_heads: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, mixer: str = "softmax", talking_heads: bool = True,
                 ca_mixer: Optional[str] = None, norm: str = "layernorm", shortcut: str = "layerscale",
                 shortcut_init: Optional[float] = None, layerscale_init: float = 1e-5, featscale: bool = False,
                 init: str = "trunc_normal", wiring: str = "pre",
                 depth_token_only: int = 2, mlp_ratio_token_only: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (), branch_scale: Optional[str] = None,
                 dynamic_img_size: bool = False, architecture: str = "cait",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if depth < 1 or depth_token_only < 1 or embed_dim < 1 or num_heads < 1:
            raise ValueError(f"depth, depth_token_only, embed_dim and num_heads must be positive, got "
                             f"{depth}, {depth_token_only}, {embed_dim}, {num_heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if shortcut_init is None and shortcut == "layerscale":
            shortcut_init = layerscale_init
        if ca_mixer is None:
            ca_mixer = "cosine" if mixer == "cosine" else "softmax"
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, dynamic_img_size=dynamic_img_size)
        self.grid_size = self.patch_embed.grid_size
        self.stem_reduction = patch_size
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))  # patches only: no class row
        self.pos_drop = nn.Dropout(drop_rate)
        total = depth + depth_token_only
        common = dict(norm=norm, norm_eps=norm_eps, branch_scale=branch_scale or shortcut,
                      branch_scale_init=shortcut_init, total_depth=total)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        th = ("talking_heads",) if talking_heads and spec.attention else ()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, spec.build(embed_dim, num_heads, TokenLayout(self.grid_size), modifiers=th, **attention),
                  Mlp(embed_dim, int(embed_dim * mlp_ratio), drop=drop_rate), featscale=featscale, wiring=wiring,
                  drop_path=drop_path_rate, **common)
            for _ in range(depth)])
        # class attention: the class token asks, all tokens answer (LipsFormer's cosine when mixer='cosine')
        ca_kwargs = {k: v for k, v in spec.kwargs.items() if k == "tau"} if ca_mixer == "cosine" else {}
        ca = MixerSpec(ca_mixer, None, (), ca_kwargs)
        self.blocks_token_only = nn.ModuleList([
            Block(embed_dim, ca.build(embed_dim, num_heads, TokenLayout(self.grid_size, 1), projection="separate",
                                      grouping="class_query", **attention),
                  Mlp(embed_dim, int(embed_dim * mlp_ratio_token_only), drop=drop_rate), wiring="prefix", **common)
            for _ in range(depth_token_only)])
        self.norm = create_norm(norm, embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.patch_embed.img_size[0],
                                                           num_classes, in_chans)

    def group_matcher(self, coarse: bool = False):
        """timm's grouping: the stem, one group per self-attention block, the class-attention blocks
        overlapping the last self-attention blocks, the final norm with the last block."""
        n_sa, n_ca = len(self.blocks), len(self.blocks_token_only)

        def matcher(name: str):
            if name.startswith(("cls_token", "pos_embed", "patch_embed")):
                return 0
            if name.startswith("blocks."):
                return int(name.split(".")[1]) + 1
            if name.startswith("blocks_token_only."):
                return int(name.split(".")[1]) + n_sa - n_ca + 1
            return n_sa if name.startswith("norm.") else float("inf")

        return matcher

# -- registered recipes (names and sizes as timm's) ---------------------------------------------
_CAIT_SIZES = {
    "xxs24": dict(embed_dim=192, depth=24, num_heads=4, layerscale_init=1e-5),
    "xxs36": dict(embed_dim=192, depth=36, num_heads=4, layerscale_init=1e-5),
    "xs24": dict(embed_dim=288, depth=24, num_heads=6, layerscale_init=1e-5),
    "s24": dict(embed_dim=384, depth=24, num_heads=8, layerscale_init=1e-5),
    "s36": dict(embed_dim=384, depth=36, num_heads=8, layerscale_init=1e-6),
    "m36": dict(embed_dim=768, depth=36, num_heads=16, layerscale_init=1e-6),
}


def _register(name: str, size: str, img: int, extra: Optional[Dict[str, Any]] = None, doc: str = "") -> None:
    defaults = dict(_CAIT_SIZES[size], patch_size=16, img_size=img, **(extra or {}))

    register_recipe(Cait, name, defaults, f"{name}: CaiT-{size.upper()} at {img}x{img} (Touvron et al., ICCV 2021)"
                    f"{doc}.", crop_pct=1.0)


for _size, _imgs in (("xxs24", (224, 384)), ("xxs36", (224, 384)), ("xs24", (384,)), ("s24", (224, 384)),
                     ("s36", (384,)), ("m36", (384,))):
    for _img in _imgs:
        _register(f"cait_{_size}_{_img}", _size, _img)
# Anti-oversmoothing (Wang et al., ICLR 2022) on CaiT: AttnScale in every talking-heads SA block,
# FeatScale on every SA branch; never in the class-attention blocks.
for _size in ("xxs24", "xxs36", "s24"):
    _register(f"attnscale_cait_{_size}_224", _size, 224, dict(mixer="attnscale"),
              " + AttnScale (Wang et al., ICLR 2022)")
    _register(f"featscale_cait_{_size}_224", _size, 224, dict(featscale=True),
              " + FeatScale (Wang et al., ICLR 2022)")

