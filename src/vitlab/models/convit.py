"""ConViT: a ViT whose first blocks use gated positional self-attention, built from vitlab parts.

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli, Touvron, Leavitt,
Morcos, Biroli & Sagun, ICML 2021).  On top of DeiT (sec. 3):

* the first ``local_up_to_layer`` (10) blocks attend with GPSA (sec. 3.1): the modifier ``gpsa`` mixing content
  and positional attention per head by a learned gate, on the projection ``qk_v`` (timm's ``qk`` and ``v``
  Linears), :mod:`vitlab.layers.gpsa`; the other blocks are plain softmax attention;
* the class token joins only before the first plain block (sec. 3.2, "Class token"): GPSA blocks see the patch
  tokens alone, whose learned position table (patches only) is added at the stem;
* init (sec. 3.1): timm's ViT init, class token N(0, 0.02), the local init of ``pos_proj`` (a soft convolution,
  ``locality_strength``) and the identity on every GPSA value projection.

``embed_dim`` is the width **per head**, as in timm's ``ConVit`` and the official code (the model is
``embed_dim * num_heads`` wide: 48 x 4 = 192 for ConViT-Ti).  Every other :class:`VisionTransformer` argument
(``mixer``, ``core``, ``modifiers`` -- added after ``gpsa`` in the GPSA blocks --, ``norm``, ``attn_position``,
``block_mixers``, ...) works as on ViT.  State-dict keys are timm's ``ConVit``'s (``blocks.{i}.attn.qk``,
``.v``, ``.pos_proj``, ``.gating_param`` in the GPSA blocks, ``.qkv`` in the others), so timm's weights load as is.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from vitlab.layers import MultiHeadAttention, TokenLayout
from vitlab.layers.gpsa import GatedPositionalAttention
from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__ = ["ConVit"]


class ConVit(VisionTransformer):
    """ConViT (d'Ascoli et al., ICML 2021); see the module docstring.

    Args beyond :class:`VisionTransformer`'s: ``embed_dim`` (per head), ``local_up_to_layer`` (how many first
    blocks use GPSA; the prefix tokens join before the next one), ``locality_strength`` (sharpness of the local
    init of the positional attention).  Defaults as timm's: no qkv bias, no ``fc_norm``.
    """

    def __init__(self, embed_dim: int = 48, num_heads: int = 4, depth: int = 12, local_up_to_layer: int = 10,
                 locality_strength: float = 1.0, qkv_bias: bool = False, fc_norm: Optional[bool] = False,
                 class_token: bool = True, reg_tokens: int = 0, architecture: str = "convit", **kwargs: Any):
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f"local_up_to_layer must be in 0..depth ({depth}), got {local_up_to_layer}")
        if local_up_to_layer == depth and (class_token or reg_tokens):
            raise ValueError(f"local_up_to_layer={local_up_to_layer} leaves no block after the GPSA blocks for the "
                             f"prefix tokens to join (depth {depth}); lower it, or build without prefix tokens "
                             "(class_token=False, global_pool='avg')")
        if "no_embed_class" in kwargs:
            raise ValueError("ConViT's position table always covers the patches only (the class token joins late); "
                             "drop no_embed_class")
        self.local_up_to_layer, self.locality_strength = local_up_to_layer, locality_strength
        super().__init__(embed_dim=embed_dim * num_heads, num_heads=num_heads, depth=depth, qkv_bias=qkv_bias,
                         fc_norm=fc_norm, class_token=class_token, reg_tokens=reg_tokens, no_embed_class=True,
                         architecture=architecture, **kwargs)

    def _token_count_parts(self, patch_drop_rate: float, patch_merger: Optional[Dict[str, Any]],
                           layout: TokenLayout, depth: int, specs, norm: str, eps: float,
                           ats: Optional[Dict[str, Any]] = None) -> List[TokenLayout]:
        """The GPSA blocks are built for the patch tokens alone; the prefix tokens join after the last of them
        (the ``after_block`` token op :meth:`join_prefix_tokens`; ``token_stage = 1`` keeps them out of the stem)."""
        n = self.local_up_to_layer
        if n and (patch_drop_rate or patch_merger is not None or ats is not None):
            raise ValueError("ConViT's GPSA blocks attend by the positions of the full token map; patch_drop_rate, "
                             "patch_merger and ats take tokens away (build with local_up_to_layer=0 to use them)")
        layouts = super()._token_count_parts(patch_drop_rate, patch_merger, layout, depth, specs, norm, eps, ats)
        if n and layout.num_prefix:
            self.token_stage, self.after_block = 1, {n - 1: "join_prefix_tokens"}
        return [TokenLayout(lay.grid) if i < n else lay for i, lay in enumerate(layouts)]

    def join_prefix_tokens(self, x: torch.Tensor, layout: TokenLayout):
        """``(B, N, C)`` patch tokens -> the class (and register) tokens in front, and their layout."""
        return self._join_prefix(x, layout)

    def _build_blocks(self, specs, layouts, heads, mlp, hidden, num_parallel, per_block, attn_kw, block_kw,
                      drop_rate, drop_path_rate) -> nn.Sequential:
        """ViT's blocks, the first ``local_up_to_layer`` with projection ``qk_v`` and modifier ``gpsa`` first."""
        gpsa = ("gpsa", dict(locality_strength=self.locality_strength))
        per_block = [dict(p, projection="qk_v", modifiers=(gpsa, *p.get("modifiers", ())))
                     if i < self.local_up_to_layer else p for i, p in enumerate(per_block)]
        return super()._build_blocks(specs, layouts, heads, mlp, hidden, num_parallel, per_block, attn_kw, block_kw,
                                     drop_rate, drop_path_rate)

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        """ViT's init, then timm's ConViT specifics: class token N(0, 0.02) (truncated at +-2), every GPSA value
        projection the identity (``pos_proj`` keeps the part's local init)."""
        super()._init_weights(init)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            gated = isinstance(m, MultiHeadAttention) and any(
                isinstance(p, GatedPositionalAttention) for p in m.modifiers)
            v = getattr(m, "v", None) if gated else None
            if isinstance(v, nn.Linear) and v.in_features == v.out_features:
                nn.init.eye_(v.weight)


# -- registered recipes (timm's names, sizes and default cfgs) --------------------------------------------------
for _name, _heads in (("tiny", 4), ("small", 9), ("base", 16)):
    register_recipe(ConVit, f"convit_{_name}",
                    dict(img_size=224, patch_size=16, embed_dim=48, num_heads=_heads, depth=12,
                         local_up_to_layer=10, locality_strength=1.0),
                    f"convit_{_name}: ConViT-{_name[0].upper()} (d'Ascoli et al., ICML 2021), {48 * _heads} wide "
                    f"({_heads} heads of 48), 10 GPSA + 2 softmax blocks, 224x224.", fixed_input_size=True)
