"""The image encoder of the Segment Anything Model as a recipe over vitlab's ViT (timm's ``samvit_*`` names, sizes
and keys).

"Segment Anything" (Kirillov, Mintun, Ravi, Mao, Rolland, Gustafson, Xiao, Whitehead, Berg, Lo, Dollar & Girshick,
ICCV 2023), appendix A, "Image encoder": an MAE-pretrained plain ViT (ViT-B/L/H, patch 16, 1024 x 1024 input, so a
64 x 64 token map) adapted to high resolution as in ViTDet ("Exploring Plain Vision Transformer Backbones for
Object Detection", Li, Mao, Girshick & He, ECCV 2022, sec. 3, "backbone adaptation"): 14 x 14 windowed attention in
most blocks and four equally spaced global attention blocks, then a neck to 256 channels.  Built from parts:

* a ViT without class token and with a learned position table on the pretraining grid (``use_abs_pos``);
* grouping ``window`` (``window_size`` 14, the map zero-padded to a multiple of the window and cropped after, as
  timm's ``window_partition`` / ``window_unpartition``; never shrunk to a smaller map: ``fit_map=False``) in every
  block except ``global_attn_indexes``, which attend over the whole map;
* position ``decomposed_relative`` in every block (``use_rel_pos``; MViTv2's decomposed relative position embeddings,
  :mod:`vitlab.layers.decomposed_position`), sized by each block's window or by the whole map;
* the neck (:class:`SamNeck`: 1x1 conv, LayerNorm over channels, 3x3 conv, LayerNorm; ``neck_chans`` 256), whose
  ``(B, 256, H, W)`` map is what ``forward_features`` returns; ``neck_chans=0`` (timm's ``None``) keeps one
  LayerNorm over the channels instead;
* timm's head: average pooling of the map and a Linear (no classifier for the SA-1B encoders, ``num_classes=0``).

The family adds the window grouping and the position part to whatever attention mixer a user picks (the part is
left out for a linear-cost core, which never forms the logits), before the user's ``attn_position``.  State-dict keys
are timm's except the classifier (``head`` here, ``head.fc`` in timm) and the shape of ``pos_embed`` (``(1, h*w, C)``
here, ``(1, h, w, C)`` in timm); :mod:`vitlab.interop.timm_samvit` maps both.  The input size is fixed (the windows
are laid on the map at ``img_size``), as timm's ``fixed_input_size``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from vitlab.layers import MixerSpec, create_norm, init_weights
from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__ = ["VisionTransformerSAM", "SamNeck", "sam_attention"]


class SamNeck(nn.Sequential):
    """SAM's neck (appendix A): a 1x1 conv to ``chans`` channels, a norm over the channels, a 3x3 conv, a norm; the
    convs without bias (timm's and the official ``neck.{0,1,2,3}``).  ``(B, C, H, W) -> (B, chans, H, W)``; the norms
    are any of :data:`~vitlab.layers.NORMS` (``layernorm``, eps 1e-6: timm's ``LayerNorm2d``)."""

    def __init__(self, dim: int, chans: int, norm: str = "layernorm", eps: float = 1e-6):
        super().__init__(nn.Conv2d(dim, chans, 1, bias=False), create_norm(norm, chans, eps=eps),
                         nn.Conv2d(chans, chans, 3, padding=1, bias=False), create_norm(norm, chans, eps=eps))

    def forward(self, fm: torch.Tensor) -> torch.Tensor:
        for i, module in enumerate(self):
            fm = module(fm) if i % 2 == 0 else module(fm.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return fm


def sam_attention(spec: MixerSpec, window_size: int, rel_pos: bool) -> Dict[str, Any]:
    """What a SAM block asks of its token mixer ``spec``: ``window_size`` windows (0: global attention) and the
    decomposed relative position part (``rel_pos``, unless the core is linear-cost); nothing for a non-attention
    mixer."""
    if not spec.attention:
        return {}
    parts: Dict[str, Any] = {}
    if window_size:
        parts["grouping"] = ("window", dict(window_size=window_size, fit_map=False))
    if rel_pos and not spec.linear_cost:
        parts["position"] = ("decomposed_relative",)
    return parts


def _global_blocks(indexes: Sequence[int], depth: int) -> frozenset:
    bad = [i for i in indexes if not -depth <= int(i) < depth]
    if bad:
        raise ValueError(f"global_attn_indexes {list(indexes)} must index blocks of depth {depth} "
                         f"(-{depth}..{depth - 1}); out of range: {bad}")
    return frozenset(int(i) % depth for i in indexes)


class VisionTransformerSAM(VisionTransformer):
    """SAM's image encoder (see the module docstring).  Beyond :class:`~vitlab.models.vit.VisionTransformer`'s
    arguments: ``window_size`` (0: global attention everywhere), ``global_attn_indexes`` (blocks with global
    attention; negative indices from the end), ``use_rel_pos`` (the decomposed relative position part),
    ``use_abs_pos`` (the learned position table) and ``neck_chans`` (0 / None: a LayerNorm instead of the neck)."""

    features_fmt = "NCHW"  # forward_features: the neck's (B, C, H, W) map, as timm's
    _global_pools = ("avg",)

    def __init__(self, img_size: int = 1024, patch_size: int = 16, num_classes: int = 0, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (), use_rel_pos: bool = True, use_abs_pos: bool = True,
                 neck_chans: Optional[int] = 256, norm: str = "layernorm", norm_eps: float = 1e-5,
                 global_pool: str = "avg", init: str = "trunc_normal", **kwargs: Any):
        if global_pool != "avg":
            raise ValueError(f"SAM's head averages the neck's map: global_pool must be 'avg', got {global_pool!r}")
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be an int >= 0 (0: global attention), got {window_size!r}")
        if kwargs.get("dynamic_img_size"):
            raise ValueError("dynamic_img_size=True is not supported: SAM's windows are laid on the map at img_size; "
                             "create the model with the img_size of the input")
        # read by _build_blocks during VisionTransformer.__init__ (plain values may be set before Module.__init__)
        self.window_size, self.use_rel_pos = window_size, use_rel_pos
        self.global_blocks = _global_blocks(global_attn_indexes, depth)
        kwargs = {"class_token": False, "pos_embed": "learned" if use_abs_pos else "none", "fc_norm": False,
                  **kwargs}
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, norm=norm, norm_eps=norm_eps, global_pool="avg",
                         init=init, **kwargs)
        self.norm = nn.Identity()  # the neck closes the encoder
        self.neck = SamNeck(embed_dim, neck_chans, norm) if neck_chans else create_norm(norm, embed_dim, eps=1e-6)
        self.num_features = self.head_hidden_size = neck_chans or embed_dim
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self.head, init)

    def _build_blocks(self, specs: List[MixerSpec], layouts, heads, mlp, hidden, num_parallel,
                      per_block: List[Dict[str, Any]], attn_kw, block_kw, drop_rate, drop_path_rate):
        per_block = [{**sam_attention(spec, 0 if i in self.global_blocks else self.window_size, self.use_rel_pos),
                      **extra} for i, (spec, extra) in enumerate(zip(specs, per_block))]
        return super()._build_blocks(specs, layouts, heads, mlp, hidden, num_parallel, per_block, attn_kw, block_kw,
                                     drop_rate, drop_path_rate)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The neck on block tokens ``(B, h*w, C)`` -> ``(B, h*w, neck_chans)`` (what ``forward_intermediates(...,
        norm=True)`` applies to every tap, as timm's)."""
        if not isinstance(self.neck, SamNeck):  # a norm over the channels (or none after pruning)
            return self.neck(x)
        h, w = self.grid_size
        fm = self.neck(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return fm.flatten(2).transpose(1, 2)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """timm's pruning; ``prune_norm`` drops the neck (features end at the last block, ``embed_dim`` wide) and, with
        a conv neck, the head sized for it."""
        if prune_norm:
            prune_head = prune_head or self.num_features != self.embed_dim
            self.neck, self.num_features = nn.Identity(), self.embed_dim
        return super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)


# timm's model_args: width, depth, heads and the global blocks (four, equally spaced)
_SIZES = {
    "base": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
_SAM = dict(patch_size=16, window_size=14, use_rel_pos=True)


def _register(name: str, size: str, img: int, crop_pct: float, what: str, **extra: Any) -> None:
    defaults = dict(_SIZES[size], img_size=img, **_SAM, **extra)
    register_recipe(VisionTransformerSAM, name, defaults, f"{name}: {what}, ViT-{size[0].upper()}/16 at {img}x{img} "
                    f"({defaults}); timm's {name}.", crop_pct=crop_pct, fixed_input_size=True)


for _size in _SIZES:  # the SA-1B encoders: features only, no classifier (timm's cfg)
    _register(f"samvit_{_size}_patch16", _size, 1024, 1.0, "SAM image encoder (Kirillov et al., ICCV 2023)",
              num_classes=0)
_register("samvit_base_patch16_224", "base", 224, 0.9, "SAM's architecture as a classifier (timm)",
          num_classes=1000, use_abs_pos=False, neck_chans=0)
