"""vit-pytorch's ``vit_pytorch.vit.ViT`` as a vitlab :class:`~vitlab.models.vit.VisionTransformer`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT"]


class ViT(VisionTransformer):
    """ViT ("An Image is Worth 16x16 Words", Dosovitskiy et al., ICLR 2021) with vit-pytorch's arguments.

    Mapping: ``image_size`` -> ``img_size``, ``dim`` -> ``embed_dim``, ``heads`` -> ``num_heads``, ``mlp_dim`` ->
    ``mlp_ratio = mlp_dim / dim``, ``dim_head`` -> ``head_dim`` (only when ``heads * dim_head != dim``),
    ``channels`` -> ``in_chans``, ``pool='cls'`` -> ``global_pool='token'``, ``pool='mean'`` -> ``global_pool='avg'``
    without class token and with the final norm before pooling (vit-pytorch's ``vit.py``), ``dropout`` ->
    ``drop_rate`` and ``attn_drop_rate``, ``emb_dropout`` -> the dropout after the position table (no head dropout).
    ``num_classes=0`` (vit-pytorch: return every token) raises: use ``forward_features``.

    Follows the paper where vit-pytorch does not (sec. 3.1, eq. 1-4): the patch embedding is one linear map
    (vit-pytorch adds LayerNorms before and after it: ``2 * patch_dim + 2 * dim`` parameters fewer here), the qkv
    projection has biases (``3 * heads * dim_head`` more per block), and a one-head attention with
    ``dim_head == dim`` keeps its output projection.  Initialisation is timm's (vit-pytorch: ``randn`` tables).
    """

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0):
        kw = vit_kwargs("ViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool, channels,
                        dim_head, dropout, emb_dropout, class_token_with_mean=False)
        super().__init__(**kw, fc_norm=False)  # vit.py normalises the tokens, then pools
        set_embedding_dropout(self, emb_dropout)
