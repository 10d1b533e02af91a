"""vit-pytorch's ``vit_pytorch.vivit.ViViT`` (its README imports it as ``ViT``) as vitlab's ViViT models."""
from __future__ import annotations

from typing import Union

from vitlab.compat.vit_pytorch._args import classes, dropouts, head_dim, mlp_ratio, refuse, set_embedding_dropout
from vitlab.models.video import VideoViT, ViViTFactorisedEncoder

__all__ = ["ViViT", "ViT"]

_POOL = {"factorized_encoder": "cls", "factorized_self_attention": "mean"}


def ViViT(*, image_size: int, image_patch_size: int, frames: int, frame_patch_size: int, num_classes: int, dim: int,
          spatial_depth: int, temporal_depth: int, heads: int, mlp_dim: int, pool: str = "cls", channels: int = 3,
          dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0, variant: str = "factorized_encoder",
          use_flash_attn: bool = True) -> Union[ViViTFactorisedEncoder, VideoViT]:
    """ViViT ("ViViT: A Video Vision Transformer", Arnab et al., ICCV 2021, sec. 3.3) with vit-pytorch's arguments:
    ``variant='factorized_encoder'`` -> :class:`~vitlab.models.video.ViViTFactorisedEncoder` (model 2; ``depth`` =
    ``spatial_depth``, ``temporal_depth``; class tokens, ``pool='cls'``), ``'factorized_self_attention'`` ->
    :class:`~vitlab.models.video.VideoViT` with ``factorisation="self_attention"`` (model 3; ``spatial_depth ==
    temporal_depth`` layers; no class token, as the paper: ``pool='mean'``).  ``image_size`` -> ``img_size``,
    ``frames`` -> ``num_frames``, ``image_patch_size`` -> ``patch_size``, ``frame_patch_size`` -> ``tubelet_size``;
    the rest as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s.  ``use_flash_attn``: vitlab picks SDPA itself.

    Follows the paper where vit-pytorch does not: a linear tubelet embedding (vit-pytorch adds LayerNorms around it)
    and qkv biases; model 3 without class token (vit-pytorch's reads frame 0's spatial class token)."""
    if variant not in _POOL:
        raise ValueError(f"ViViT: variant={variant!r}; expected one of {tuple(_POOL)}")
    if pool != _POOL[variant]:
        raise refuse("ViViT", "pool", pool, f"{_POOL[variant]!r} for variant={variant!r} (the paper's pooling)")
    kw = dict(img_size=image_size, num_frames=frames, patch_size=image_patch_size, tubelet_size=frame_patch_size,
              in_chans=channels, num_classes=classes("ViViT", num_classes), embed_dim=dim, num_heads=heads,
              mlp_ratio=mlp_ratio("ViViT", mlp_dim, dim), mixer_kwargs=head_dim("ViViT", dim, heads, dim_head),
              **dropouts("ViViT", dropout, emb_dropout))
    if variant == "factorized_encoder":
        if emb_dropout:
            raise refuse("ViViT", "emb_dropout", emb_dropout, "0 with variant='factorized_encoder'")
        model = ViViTFactorisedEncoder(depth=spatial_depth, temporal_depth=temporal_depth, **kw)
        model.head_drop.p = 0.0  # vit-pytorch has no head dropout
        return model
    if spatial_depth != temporal_depth:
        raise ValueError(f"ViViT: spatial_depth={spatial_depth} and temporal_depth={temporal_depth} must be equal "
                         "for variant='factorized_self_attention'")
    model = VideoViT(depth=spatial_depth, factorisation="self_attention", **kw)
    set_embedding_dropout(model, emb_dropout)
    return model


ViT = ViViT  # the name vit-pytorch's README imports
