"""vit-pytorch's ``vit_pytorch.vit_with_patch_merger`` (``ViT`` and the standalone ``PatchMerger``)."""
from __future__ import annotations

from typing import Optional

import torch

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.layers import TokenLayout
from vitlab.layers.token_ops import PatchMerger as _PatchMerger
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT", "PatchMerger"]


class ViT(VisionTransformer):
    """ViT with a PatchMerger ("Learning to Merge Tokens in Vision Transformers", Renggli et al., 2022, sec. 3)
    with vit-pytorch's arguments (as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s): no class token, the final
    norm, then mean pooling; ``patch_merge_layer`` (default ``depth // 2``) -> ``patch_merger["after"]`` (the
    number of blocks before the merger), ``patch_merge_num_tokens`` -> ``patch_merger["num_tokens"]``.

    Follows the paper where vit-pytorch does not: a linear patch embedding (vit-pytorch adds LayerNorms before and
    after it: ``2 * patch_dim + 2 * dim`` parameters fewer here), qkv biases (``3 * heads * dim_head`` more per
    block), a position table of the patches only (vit-pytorch's has one unused row more: ``dim`` fewer here) and
    merge scores without a ``1/sqrt(dim)`` factor (a rescaled query, the same model)."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, patch_merge_layer: Optional[int] = None, patch_merge_num_tokens: int = 8,
                 channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0):
        kw = vit_kwargs("vit_with_patch_merger.ViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                        "mean", channels, dim_head, dropout, emb_dropout, class_token_with_mean=False)
        after = depth // 2 if patch_merge_layer is None else patch_merge_layer
        super().__init__(patch_merger=dict(after=after, num_tokens=patch_merge_num_tokens), fc_norm=False, **kw)
        set_embedding_dropout(self, emb_dropout)


class PatchMerger(_PatchMerger):
    """vitlab's :class:`~vitlab.layers.token_ops.PatchMerger` with vit-pytorch's arguments: ``(B, N, dim)`` ->
    ``(B, num_tokens_out, dim)`` (every input token is merged; a model passes its layout to keep prefix tokens)."""

    def __init__(self, dim: int, num_tokens_out: int):
        super().__init__(dim, num_tokens_out)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None):
        if layout is None:  # vit-pytorch's call: plain tokens in, merged tokens out
            return super().forward(x, TokenLayout((x.shape[1],)))[0]
        return super().forward(x, layout)
