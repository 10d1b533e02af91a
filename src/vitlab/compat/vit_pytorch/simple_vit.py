"""vit-pytorch's ``vit_pytorch.simple_vit.SimpleViT`` as vitlab's :class:`~vitlab.models.vit_variants.SimpleViT`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import Size, vit_kwargs
from vitlab.models.vit_variants import SimpleViT as _SimpleViT

__all__ = ["SimpleViT"]


class SimpleViT(_SimpleViT):
    """SimpleViT ("Better plain ViT baselines for ImageNet-1k", Beyer, Zhai & Kolesnikov, 2022, sec. 2) with
    vit-pytorch's arguments (mapped as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s; no pooling or dropout
    arguments: global average pooling without class token, big_vision's fixed 2-D sin-cos table).

    Follows the paper (big_vision) where vit-pytorch does not: the patch embedding is one linear map (vit-pytorch
    adds LayerNorms before and after it: ``2 * patch_dim + 2 * dim`` parameters fewer here), the qkv and output
    projections have biases (``3 * heads * dim_head + dim`` more per block), the head starts at zero."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64):
        super().__init__(**vit_kwargs("SimpleViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                                      "mean", channels, dim_head, class_token_with_mean=False))
