"""vit-pytorch's ``vit_pytorch.vit_3d.ViT`` as vitlab's :class:`~vitlab.models.video.VideoViT` (no factorisation)."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import classes, dropouts, head_dim, mlp_ratio, refuse, set_embedding_dropout
from vitlab.models.video import VideoViT

__all__ = ["ViT"]


class ViT(VideoViT):
    """The 3-D ViT (ViViT's model 1, "ViViT: A Video Vision Transformer", Arnab et al., ICCV 2021, sec. 3.3) with
    vit-pytorch's arguments: ``image_size`` -> ``img_size``, ``frames`` -> ``num_frames``, ``image_patch_size`` ->
    ``patch_size``, ``frame_patch_size`` -> ``tubelet_size``; the others as
    :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s (``pool`` must be ``'cls'``).  Input ``(B, C, T, H, W)``.

    Follows the paper where vit-pytorch does not: the tubelet embedding is one linear map of each tubelet
    (sec. 3.2; vit-pytorch adds LayerNorms before and after it: ``2 * tubelet_dim + 2 * dim`` parameters fewer
    here) and the qkv projection has biases (``3 * heads * dim_head`` more per block)."""

    def __init__(self, *, image_size: int, image_patch_size: int, frames: int, frame_patch_size: int,
                 num_classes: int, dim: int, depth: int, heads: int, mlp_dim: int, pool: str = "cls",
                 channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0):
        if pool != "cls":
            raise refuse("vit_3d.ViT", "pool", pool, "'cls'")
        super().__init__(img_size=image_size, num_frames=frames, patch_size=image_patch_size,
                         tubelet_size=frame_patch_size, in_chans=channels, num_classes=classes("ViT", num_classes),
                         embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio("ViT", mlp_dim, dim),
                         mixer_kwargs=head_dim("ViT", dim, heads, dim_head), **dropouts("ViT", dropout, emb_dropout))
        set_embedding_dropout(self, emb_dropout)
