"""vit-pytorch's ``vit_pytorch.simple_vit_3d.SimpleViT`` as vitlab's :class:`~vitlab.models.video.VideoViT`
(no factorisation, no class token, big_vision's sin-cos code in 3-D, mean pooling)."""
from __future__ import annotations

import torch

from vitlab.compat.vit_pytorch._args import Size, classes, head_dim, mlp_ratio, refuse
from vitlab.models.video import VideoViT

__all__ = ["SimpleViT"]


class SimpleViT(VideoViT):
    """SimpleViT ("Better plain ViT baselines for ImageNet-1k", Beyer, Zhai & Kolesnikov, 2022, sec. 2) over tubelets
    (ViViT's tubelet embedding, "ViViT: A Video Vision Transformer", Arnab et al., ICCV 2021, sec. 3.2) with
    vit-pytorch's arguments: ``image_size`` -> ``img_size`` (square), ``frames`` -> ``num_frames``,
    ``image_patch_size`` -> ``patch_size`` (square), ``frame_patch_size`` -> ``tubelet_size``, ``dim``, ``depth``,
    ``heads``, ``mlp_dim``, ``channels``, ``dim_head`` as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s.  No class
    token, the fixed 3-D big_vision sin-cos code (``pos_embed="sincos_big_vision"``:
    :func:`~vitlab.layers.pos_embed.sincos_nd_big_vision`, vit-pytorch's ``posemb_sincos_3d``), the final norm, then
    the mean of the tokens; the head starts at zero (big_vision).  Input ``(B, C, T, H, W)``.

    Follows the paper (big_vision) where vit-pytorch does not: the tubelet embedding is one linear map
    (vit-pytorch adds LayerNorms before and after it: ``2 * tubelet_dim + 2 * dim`` parameters fewer here), the
    qkv and output projections have biases (``3 * heads * dim_head + dim`` more per block)."""

    def __init__(self, *, image_size: Size, image_patch_size: Size, frames: int, frame_patch_size: int,
                 num_classes: int, dim: int, depth: int, heads: int, mlp_dim: int, channels: int = 3,
                 dim_head: int = 64):
        super().__init__(img_size=_square("image_size", image_size), num_frames=frames,
                         patch_size=_square("image_patch_size", image_patch_size), tubelet_size=frame_patch_size,
                         in_chans=channels, num_classes=classes("SimpleViT", num_classes), embed_dim=dim,
                         depth=depth, num_heads=heads, mlp_ratio=mlp_ratio("SimpleViT", mlp_dim, dim),
                         mixer_kwargs=head_dim("SimpleViT", dim, heads, dim_head), pos_embed="sincos_big_vision",
                         class_token=False, architecture="simple_vit_3d")
        with torch.no_grad():  # big_vision's head_zeroinit
            self.head.weight.zero_()
            self.head.bias.zero_()


def _square(name: str, size: Size) -> int:
    """vitlab's tubelet stem is square: an int, or a pair of equal sides."""
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise refuse("SimpleViT", name, size, "an int or a pair of equal sides (square frames and patches)")
    return int(size[0])
