"""vit-pytorch's ``vit_pytorch.deepvit.DeepViT`` as vitlab's :class:`~vitlab.models.vit_variants.DeepViT`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.models.vit_variants import DeepViT as _DeepViT

__all__ = ["DeepViT"]


class DeepViT(_DeepViT):
    """DeepViT ("DeepViT: Towards Deeper Vision Transformer", Zhou et al., 2021, sec. 4) with vit-pytorch's
    arguments (mapped as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s; ``pool='mean'`` keeps the class token
    and normalises after pooling, as vit-pytorch's ``deepvit.py``): re-attention in every block, a linear patch
    embedding.

    Follows the paper where vit-pytorch does not: re-attention's norm is BatchNorm over the heads (eq. 4;
    vit-pytorch: LayerNorm, the same ``2 * heads`` parameters) and its ``heads x heads`` map is a 1x1 conv with
    bias (``heads`` more per block) starting at the identity; the patch embedding has no LayerNorms
    (``2 * patch_dim + 2 * dim`` fewer); the qkv projection has biases (``3 * heads * dim_head`` more per block).
    Mean pooling averages the patch tokens only (vit-pytorch also averages in the class token)."""

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0):
        kw = vit_kwargs("DeepViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool, channels,
                        dim_head, dropout, emb_dropout)
        super().__init__(embed="patch", modifiers=("reattention",), **kw)
        set_embedding_dropout(self, emb_dropout)
