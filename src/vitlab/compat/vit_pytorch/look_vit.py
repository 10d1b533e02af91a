"""vit-pytorch's ``vit_pytorch.look_vit.LookViT`` as vitlab's :class:`~vitlab.models.lookupvit.LookupViT`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import classes, dropouts, head_dim, refuse
from vitlab.models.lookupvit import LookupViT

__all__ = ["LookViT"]


class LookViT(LookupViT):
    """LookupViT ("LookupViT: Compressing visual information to a limited number of tokens", Koner et al., ECCV
    2024) with vit-pytorch's arguments: ``dim`` -> ``embed_dim``, ``image_size`` -> ``img_size``, ``depth``,
    ``heads`` -> ``num_heads``, ``mlp_factor`` -> ``mlp_ratio``, ``highres_patch_size`` -> ``patch_size`` (the
    lookup tokens), ``patch_size`` -> ``compressed_size = image_size // patch_size``, ``highres_mlp_factor`` ->
    ``lookup_mlp_ratio``, ``patch_conv_kernel_size`` -> ``patch_kernel``, ``dropout`` -> ``attn_drop_rate`` and
    ``drop_rate``, ``channels`` -> ``in_chans``; ``dim_head`` and ``cross_attn_dim_head`` must be ``dim / heads``
    and ``cross_attn_heads`` must be ``heads``.

    Follows the paper where vit-pytorch does not: a learned position table on the lookup tokens (vit-pytorch:
    sin-cos, added after its LayerNorm), a pre-norm on the lookup tokens before the propagation (vit-pytorch:
    none, a LayerNorm after it instead), LayerNorms with a bias and Linears with biases (vit-pytorch: neither),
    and a head on the normalised compressed tokens (vit-pytorch: on the sum of both streams' means).  Output
    shapes are vit-pytorch's.
    """

    def __init__(self, *, dim: int, image_size: int, num_classes: int, depth: int = 3, patch_size: int = 16,
                 heads: int = 8, mlp_factor: float = 4, dim_head: int = 64, highres_patch_size: int = 12,
                 highres_mlp_factor: float = 4, cross_attn_heads: int = 8, cross_attn_dim_head: int = 64,
                 patch_conv_kernel_size: int = 7, dropout: float = 0.1, channels: int = 3):
        head_dim("LookViT", dim, heads, dim_head, per_head=False)
        head_dim("LookViT", dim, cross_attn_heads, cross_attn_dim_head, per_head=False)
        if cross_attn_heads != heads:
            raise refuse("LookViT", "cross_attn_heads", cross_attn_heads, f"heads ({heads})")
        if image_size % patch_size or image_size % highres_patch_size or patch_size <= highres_patch_size:
            raise ValueError(f"LookViT: image_size={image_size} must be divisible by patch_size={patch_size} and "
                             f"highres_patch_size={highres_patch_size}, with patch_size > highres_patch_size")
        drops = dropouts("LookViT", dropout, 0.0)
        super().__init__(img_size=image_size, patch_size=highres_patch_size, in_chans=channels,
                         num_classes=classes("LookViT", num_classes), embed_dim=dim, depth=depth, num_heads=heads,
                         mlp_ratio=mlp_factor, lookup_mlp_ratio=highres_mlp_factor,
                         compressed_size=image_size // patch_size, patch_kernel=patch_conv_kernel_size, **drops)
