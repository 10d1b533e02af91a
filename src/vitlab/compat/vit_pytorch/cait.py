"""vit-pytorch's ``vit_pytorch.cait.CaiT`` as vitlab's :class:`~vitlab.models.cait.Cait`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import classes, dropouts, head_dim, layerscale_init, mlp_ratio, \
    set_embedding_dropout
from vitlab.models.cait import Cait

__all__ = ["CaiT"]


class CaiT(Cait):
    """CaiT ("Going deeper with Image Transformers", Touvron et al., ICCV 2021) with vit-pytorch's arguments:
    ``dim`` -> ``embed_dim``, ``depth`` -> ``depth`` (self-attention blocks), ``cls_depth`` -> ``depth_token_only``
    (class-attention blocks), ``heads`` -> ``num_heads``, ``mlp_dim`` -> ``mlp_ratio`` and ``mlp_ratio_token_only``
    (``mlp_dim / dim``), ``dim_head`` must be ``dim / heads``, ``dropout`` -> ``drop_rate`` and ``attn_drop_rate``,
    ``emb_dropout`` -> the dropout after the position table, ``layer_dropout`` -> ``drop_path_rate`` (the same in
    every self-attention block, CaiT's rule), LayerScale initialised by the paper's depth rule (sec. 3.1: 0.1 up to
    18 blocks, 1e-5 up to 24, 1e-6 beyond).

    Follows the paper where vit-pytorch does not: stochastic depth drops a residual branch per sample, in training
    only (vit-pytorch's ``layer_dropout`` drops whole layers for the whole batch, in evaluation too); talking
    heads only in the self-attention blocks, as Linear maps with bias (``2 * heads`` more per block; vit-pytorch
    also mixes heads in class attention: ``2 * heads ** 2`` fewer per class-attention block here); class
    attention reads the normalised class and patch tokens; qkv biases (``3 * dim`` more per block); one linear
    patch embedding (vit-pytorch adds LayerNorms around it: ``2 * patch_dim + 2 * dim`` fewer); LayerScale
    initialised by the model's depth (vit-pytorch: by each block's index)."""

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, cls_depth: int,
                 heads: int, mlp_dim: int, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
                 layer_dropout: float = 0.0):
        head_dim("CaiT", dim, heads, dim_head, per_head=False)
        ratio = mlp_ratio("CaiT", mlp_dim, dim)
        super().__init__(img_size=image_size, patch_size=patch_size, num_classes=classes("CaiT", num_classes),
                         embed_dim=dim, depth=depth, depth_token_only=cls_depth, num_heads=heads, mlp_ratio=ratio,
                         mlp_ratio_token_only=ratio, drop_path_rate=layer_dropout,
                         layerscale_init=layerscale_init(depth), **dropouts("CaiT", dropout, emb_dropout))
        set_embedding_dropout(self, emb_dropout)
