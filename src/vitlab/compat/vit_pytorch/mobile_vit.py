"""vit-pytorch's ``vit_pytorch.mobile_vit.MobileViT`` as vitlab's :class:`~vitlab.models.mobilevit.MobileViT`."""
from __future__ import annotations

from typing import Sequence, Tuple

from vitlab.compat.vit_pytorch._args import classes, refuse
from vitlab.models.mobilevit import MobileViT as _MobileViT

__all__ = ["MobileViT"]


def _square(image_size) -> int:
    ih, iw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if ih != iw:
        raise refuse("MobileViT", "image_size", image_size, "a square size (the model itself takes any input size)")
    return int(ih)


def _widths(channels: Sequence[int]) -> Tuple[int, ...]:
    """vit-pytorch's 11 ``channels``: stem, stage 1, stage 2 (first block, others), then (MV2, MobileViT block)
    for stages 3-5, and the final 1x1 conv; a stage's entries must agree (vit-pytorch's shapes need it too)."""
    c = tuple(channels)
    if len(c) != 11:
        raise refuse("MobileViT", "channels", list(c), "11 widths (stem, 2 + 2 + 2 + 2 + 1 per stage, final conv)")
    pairs = [(2, 3), (4, 5), (6, 7), (8, 9)]
    if any(c[a] != c[b] for a, b in pairs):
        raise refuse("MobileViT", "channels", list(c), "channels[2] == channels[3], [4] == [5], [6] == [7], "
                     "[8] == [9] (one width per stage)")
    return c


class MobileViT(_MobileViT):
    """MobileViT ("MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer", Mehta and
    Rastegari, ICLR 2022) with vit-pytorch's arguments: ``image_size`` (square) -> ``img_size``, ``channels``
    (11 widths) -> ``stem_chs``, per-stage ``channels`` and ``num_features``, ``dims`` -> the transformer widths of
    stages 3-5, ``depths`` -> their transformer depths, ``expansion`` (MV2), ``patch_size``; ``kernel_size`` must
    be 3 (the paper's, and what vit-pytorch's fixed padding of 1 supports).

    Follows the paper and the official code where vit-pytorch does not: 4 heads of ``d / 4`` channels with qkv
    biases (vit-pytorch: 4 heads of 8 channels, no bias), MLPs of ``2 d`` in every stage (vit-pytorch: ``2 d``
    in stage 3, ``4 d`` in stages 4-5), a LayerNorm after the transformer (vit-pytorch: none), the block's
    input first in the fusion concatenation, a classifier with a bias (vit-pytorch: none); a map that is not a
    multiple of the patch is resized around the transformer (vit-pytorch refuses).  Parameter counts therefore
    differ from vit-pytorch's; the output shape does not.
    """

    def __init__(self, image_size, dims: Sequence[int], channels: Sequence[int], num_classes: int,
                 expansion: float = 4, kernel_size: int = 3, patch_size: Tuple[int, int] = (2, 2),
                 depths: Sequence[int] = (2, 4, 3)):
        if kernel_size != 3:
            raise refuse("MobileViT", "kernel_size", kernel_size, "3 (the paper's 3x3 local and fusion convs)")
        if len(dims) != 3 or len(depths) != 3:
            raise refuse("MobileViT", "dims/depths", (tuple(dims), tuple(depths)), "3 values each (stages 3-5)")
        c = _widths(channels)
        super().__init__(img_size=_square(image_size), num_classes=classes("MobileViT", num_classes), stem_chs=c[0],
                         channels=(c[1], c[3], c[5], c[7], c[9]), depths=(1, 3, 1, 1, 1), expansion=float(expansion),
                         transformer_dims=(0, 0, *dims), transformer_depths=(0, 0, *depths),
                         patch_size=tuple(patch_size), num_features=c[10])
