"""vit-pytorch's ``vit_pytorch.cross_vit.CrossViT`` as vitlab's :class:`~vitlab.models.crossvit.CrossVit`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import classes, dropouts, mlp_ratio, refuse
from vitlab.models.crossvit import CrossVit

__all__ = ["CrossViT"]


class CrossViT(CrossVit):
    """CrossViT ("CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification", Chen, Fan &
    Panda, ICCV 2021) with vit-pytorch's arguments: ``image_size`` -> ``img_size`` (both branches read the image at
    that size, as vit-pytorch's: ``img_scale=(1, 1)``), ``sm_dim`` / ``lg_dim`` -> ``embed_dim``,
    ``sm_patch_size`` / ``lg_patch_size`` -> ``patch_size``, ``depth`` (multi-scale blocks) with
    ``sm_enc_depth``, ``lg_enc_depth`` and ``cross_attn_depth`` -> ``depth=((sm, lg, cross), ...)``,
    ``sm_enc_heads`` / ``lg_enc_heads`` -> ``num_heads``, ``*_mlp_dim`` -> ``mlp_ratio``, ``sm_enc_dim_head`` and
    ``lg_enc_dim_head`` (must be equal) -> ``mixer_kwargs['head_dim']``, ``cross_attn_heads`` /
    ``cross_attn_dim_head`` -> ``fusion_heads`` / ``fusion_head_dim``, ``dropout`` -> ``attn_drop_rate`` and
    ``proj_drop_rate``, ``emb_dropout`` -> ``pos_drop_rate``, ``channels`` -> ``in_chans``.

    Follows the paper (sec. 3, Eqs. 5-7) and its official code where vit-pytorch does not: a linear (conv) patch
    projection (vit-pytorch: LayerNorm, Linear, LayerNorm on flattened patches); one norm per branch after the
    last multi-scale block (vit-pytorch: a LayerNorm closing every branch encoder); per multi-scale block one
    ``f`` (LayerNorm, GELU, Linear) before and one ``g`` after the cross-attention, the class token replaced by
    ``g(y_cls)`` (vit-pytorch: a bare Linear in and out around every cross-attention round, only when the widths
    differ, with a residual around it); the cross-attention normalises the other branch's patch tokens too
    (vit-pytorch: the class token only); qkv biases; the logits are the mean of the branches' heads on the
    normalised class tokens (vit-pytorch: the sum of two LayerNorm + Linear heads).  Output shapes are
    vit-pytorch's.
    """

    def __init__(self, *, image_size: int, num_classes: int, sm_dim: int, lg_dim: int, sm_patch_size: int = 12,
                 sm_enc_depth: int = 1, sm_enc_heads: int = 8, sm_enc_mlp_dim: int = 2048, sm_enc_dim_head: int = 64,
                 lg_patch_size: int = 16, lg_enc_depth: int = 4, lg_enc_heads: int = 8, lg_enc_mlp_dim: int = 2048,
                 lg_enc_dim_head: int = 64, cross_attn_depth: int = 2, cross_attn_heads: int = 8,
                 cross_attn_dim_head: int = 64, depth: int = 3, dropout: float = 0.1, emb_dropout: float = 0.1,
                 channels: int = 3):
        if sm_enc_dim_head != lg_enc_dim_head:
            raise refuse("CrossViT", "lg_enc_dim_head", lg_enc_dim_head,
                         f"the same head width as sm_enc_dim_head ({sm_enc_dim_head}) in both branches")
        if depth < 1 or cross_attn_depth < 1:
            raise ValueError(f"CrossViT: depth={depth} and cross_attn_depth={cross_attn_depth} must be >= 1")
        drops = dropouts("CrossViT", dropout, emb_dropout)
        cross = cross_attn_depth if cross_attn_depth > 1 else 0  # one round: timm's key layout (one fusion Block)
        super().__init__(img_size=image_size, img_scale=(1.0, 1.0), patch_size=(sm_patch_size, lg_patch_size),
                         in_chans=channels, num_classes=classes("CrossViT", num_classes), embed_dim=(sm_dim, lg_dim),
                         depth=((sm_enc_depth, lg_enc_depth, cross),) * depth,
                         num_heads=(sm_enc_heads, lg_enc_heads),
                         mlp_ratio=(mlp_ratio("CrossViT", sm_enc_mlp_dim, sm_dim),
                                    mlp_ratio("CrossViT", lg_enc_mlp_dim, lg_dim), 1.0),
                         mixer_kwargs=dict(head_dim=sm_enc_dim_head), fusion_heads=cross_attn_heads,
                         fusion_head_dim=cross_attn_dim_head, attn_drop_rate=drops["attn_drop_rate"],
                         proj_drop_rate=drops["drop_rate"], pos_drop_rate=emb_dropout, drop_path_rate=0.0,
                         architecture="crossvit")
