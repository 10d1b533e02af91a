"""vit-pytorch's ``vit_pytorch.parallel_vit.ViT`` as a vitlab :class:`~vitlab.models.vit.VisionTransformer`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT"]


class ViT(VisionTransformer):
    """Parallel ViT ("Three things everyone should know about Vision Transformers", Touvron et al., ECCV 2022,
    sec. 3) with vit-pytorch's arguments (as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s, ``pool='mean'`` keeps
    the class token), ``num_parallel_branches`` -> ``num_parallel``: each block sums that many attention
    branches, then that many MLP branches, each with its own pre-norm.

    Follows the paper where vit-pytorch does not: qkv biases (``3 * heads * dim_head`` parameters more per
    attention branch).  Mean pooling averages the patch tokens only (vit-pytorch also averages in the class
    token), then normalises (as vit-pytorch)."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, pool: str = "cls", num_parallel_branches: int = 2, channels: int = 3,
                 dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0):
        kw = vit_kwargs("parallel_vit.ViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool,
                        channels, dim_head, dropout, emb_dropout)
        super().__init__(num_parallel=num_parallel_branches, **kw)
        set_embedding_dropout(self, emb_dropout)
