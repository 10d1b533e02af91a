"""XCiT: Cross-Covariance Image Transformers, built from vitlab parts.

"XCiT: Cross-Covariance Image Transformers" (El-Nouby, Touvron, Caron, Bojanowski, Douze, Joulin, Laptev,
Neverova, Synnaeve, Verbeek, Jegou; NeurIPS 2021).  A ViT whose parts are:

* **cross-covariance attention** (sec. 3.2): the ``cross_covariance`` core (:mod:`vitlab.layers.xca`), a
  d x d attention over channels with a learned temperature per head, linear in the tokens;
* **local patch interaction** (sec. 3.3): a third residual branch of the one :class:`Block`
  (``local_mixer=``, :class:`~vitlab.layers.xcit_parts.LocalPatchInteraction`) between attention and MLP;
* a **convolutional patch stem** (3x3 stride-2 convs + BN + GELU) and **Fourier position features**
  computed for any map (:mod:`vitlab.layers.xcit_parts`): the model takes any input size divisible by the patch;
* LayerScale on every branch (``eta``: 1.0 for 12 blocks, 1e-5 for 24) and stochastic depth at the same rate
  in every XCA block;
* CaiT's **class attention** (sec. 3.3, Touvron et al., ICCV 2021): the class token joins after the XCA
  blocks, and ``cls_attn_layers`` blocks update it (wiring ``"prefix_xcit"``: timm's / the official code's
  block, whose residuals also touch the patch tokens; ``tokens_norm`` normalises every token, not only the
  class token, before the MLP).

Every part is an argument as in the other families (``mixer``, ``core``, ``modifiers``, ``mixer_kwargs``, ``norm``,
``branch_scale``, ``init``).  State-dict keys are timm's ``Xcit`` except the LayerScale vectors ``ls{1,2,3}.gamma``
(timm: ``gamma1`` / ``gamma2`` / ``gamma3``), renamed by :mod:`vitlab.interop.timm_xcit`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.layers.xcit_parts import FourierPositionEncoding, LocalPatchInteraction, XcitConvStem
from vitlab.models.backbone import Backbone
from vitlab.models.base import VitlabModel, make_default_cfg, register_recipe
from vitlab.models.block import Block

__all__ = ["Xcit"]


class Xcit(Backbone):
    """XCiT (El-Nouby et al., NeurIPS 2021) whose parts are arguments; see the module docstring.

    Args as timm's ``Xcit`` (``img_size``, ``patch_size`` 8 or 16, ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_ratio``, ``qkv_bias``, ``drop_rate`` (head), ``pos_drop_rate``, ``proj_drop_rate``, ``attn_drop_rate``,
    ``drop_path_rate`` (the same in every XCA block), ``cls_attn_layers``, ``use_pos_embed``, ``eta``,
    ``tokens_norm``, ``global_pool`` ``token`` | ``avg``), plus the parts: ``mixer`` (default
    ``cross_covariance``), ``core``, ``modifiers``, ``attn_position`` (token attention only: cross-covariance
    refuses ``("rope",)``), ``mixer_kwargs`` (the XCA blocks' mixer; the class attention
    stays softmax), ``norm``, ``norm_eps``, ``branch_scale`` (``layerscale``, init ``eta``), ``featscale`` and
    ``wiring`` (``pre`` | ``post`` of the XCA blocks), ``init``.
    """

    stage_attr, tail_attr = "blocks", "cls_attn_blocks"  # feature taps: the XCA blocks
    prefix_names, token_stage = ("cls_token",), 1  # the class token joins the class-attention blocks
    global_pool, _global_pools = "token", ("token", "avg")
    _no_weight_decay_keys = VitlabModel._no_weight_decay_keys + ("temperature",)  # per-head gains, as timm's XCA

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 cls_attn_layers: int = 2, use_pos_embed: bool = True, eta: float = 1.0, tokens_norm: bool = False,
                 mixer: str = "cross_covariance", core: Optional[str] = None, modifiers: Sequence[str] = (),
                 attn_position: Sequence[Any] = (), mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, branch_scale: str = "layerscale",
                 featscale: bool = False, wiring: str = "pre", init: str = "trunc_normal", architecture: str = "xcit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if depth < 1 or cls_attn_layers < 1 or embed_dim < 1 or num_heads < 1:
            raise ValueError(f"depth, cls_attn_layers, embed_dim and num_heads must be positive, got "
                             f"{depth}, {cls_attn_layers}, {embed_dim}, {num_heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = XcitConvStem(img_size, patch_size, in_chans, embed_dim, dynamic_img_size=True)
        self.grid_size, self.stem_reduction = self.patch_embed.grid_size, self.patch_embed.patch_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._set_global_pool(global_pool)
        self.pos_embed = FourierPositionEncoding(embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        common = dict(norm=norm, norm_eps=norm_eps, branch_scale=branch_scale, branch_scale_init=eta,
                      total_depth=depth + cls_attn_layers)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        mlp = lambda: Mlp(embed_dim, int(embed_dim * mlp_ratio), drop=proj_drop_rate)  # noqa: E731
        self.blocks = nn.Sequential(*[
            Block(embed_dim, spec.build(embed_dim, num_heads, TokenLayout(self.grid_size), **attention), mlp(),
                  local_mixer=LocalPatchInteraction(embed_dim), drop_path=drop_path_rate, featscale=featscale,
                  wiring=wiring, **common)
            for _ in range(depth)])
        ca = MixerSpec("softmax")  # class attention: the class token asks, every token answers
        self.cls_attn_blocks = nn.ModuleList([
            Block(embed_dim, ca.build(embed_dim, num_heads, TokenLayout(self.grid_size, 1), projection="separate",
                                      grouping="class_query", **attention),
                  mlp(), wiring="prefix_xcit", tokens_norm=tokens_norm, **common)
            for _ in range(cls_attn_layers)])
        self.norm = create_norm(norm, embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.patch_embed.img_size[0], num_classes,
                                                           in_chans, crop_pct=1.0)

    def forward_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, TokenLayout]:
        """Image -> patch tokens plus their Fourier position codes (no class token: it joins the class
        attention) and their :class:`TokenLayout`."""
        self.check_input(x)
        x, hw = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(hw)
        return self.pos_drop(x), TokenLayout(hw)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem, one group per XCA block, the class-attention blocks and the norm last."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=r"^blocks\.(\d+)",
                    cls_attn_blocks=[(r"^cls_attn_blocks\.(\d+)", None), (r"^norm", (99999,))])


# -- registered recipes (timm's names and sizes; El-Nouby et al., NeurIPS 2021, Table 1) -----------------------
_XCIT_SIZES = {
    "nano_12": dict(embed_dim=128, depth=12, num_heads=4, eta=1.0, tokens_norm=False),
    "tiny_12": dict(embed_dim=192, depth=12, num_heads=4, eta=1.0, tokens_norm=True),
    "small_12": dict(embed_dim=384, depth=12, num_heads=8, eta=1.0, tokens_norm=True),
    "tiny_24": dict(embed_dim=192, depth=24, num_heads=4, eta=1e-5, tokens_norm=True),
    "small_24": dict(embed_dim=384, depth=24, num_heads=8, eta=1e-5, tokens_norm=True),
    "medium_24": dict(embed_dim=512, depth=24, num_heads=8, eta=1e-5, tokens_norm=True),
    "large_24": dict(embed_dim=768, depth=24, num_heads=16, eta=1e-5, tokens_norm=True),
}

for _size, _dims in _XCIT_SIZES.items():
    for _patch in (16, 8):
        for _img in (224, 384):
            _name = f"xcit_{_size}_p{_patch}_{_img}"
            _label = f"XCiT-{_size.split('_')[0][0].upper()}{_size.split('_')[1]}/{_patch}"
            register_recipe(Xcit, _name, dict(_dims, patch_size=_patch, img_size=_img),
                            f"{_name}: {_label} at {_img}x{_img} (El-Nouby et al., NeurIPS 2021).",
                            crop_pct=1.0, first_conv="patch_embed.proj.0.0", classifier="head")
