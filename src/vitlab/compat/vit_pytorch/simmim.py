"""vit-pytorch's ``vit_pytorch.simmim.SimMIM`` on vitlab's SimMIM (:class:`vitlab.pretrain.simmim.SimMIM`)."""
from __future__ import annotations

from torch import nn

from vitlab.compat.vit_pytorch._args import as_value_error, encoder_input, fraction
from vitlab.pretrain.simmim import SimMIM as _SimMIM

__all__ = ["SimMIM"]


class SimMIM(_SimMIM):
    """SimMIM ("SimMIM: A Simple Framework for Masked Image Modeling", Xie et al., CVPR 2022, sec. 3) with
    vit-pytorch's arguments: ``mim = SimMIM(encoder=v, masking_ratio=0.5); loss = mim(images)``.

    Mapping: ``encoder`` -> the encoder (any vitlab transformer backbone, trained in place), ``masking_ratio`` ->
    ``mask_ratio``.  ``forward(images)`` returns the loss; ``last`` holds the reconstruction and the pixel mask.

    Follows the paper (microsoft/SimMIM) where vit-pytorch does not:

    * the mask is drawn on a grid of mask patches (32 px at the paper's 192 / 224 px input, sec. 3.1; scaled for
      small images by :func:`vitlab.pretrain.masking.mask_patch_size`), ``ceil(G * G * masking_ratio)`` of the
      ``G x G`` cells: with 16 px patches at 224 px whole 2 x 2 blocks of patches are masked, where vit-pytorch
      masks ``int(L * masking_ratio)`` single patches (at its README's 256 px / 32 px patches both mask patches);
    * a masked token is the mask token plus what the stem adds independently of the pixels (position table and
      patch-embedding bias; the masked pixels are zeroed first), where vit-pytorch replaces it by the mask token
      plus the position table;
    * the loss is the L1 distance averaged over the masked pixels and channels (sec. 3.4); vit-pytorch divides that
      mean once more by the number of masked patches, so its loss is vitlab's divided by ``int(L * masking_ratio)``.
    The head is the same one linear map per token to its patch's pixels (here a 1x1 conv and a pixel shuffle).
    """

    def __init__(self, *, encoder: nn.Module, masking_ratio: float = 0.5):
        name, side, chans = encoder_input("SimMIM", "encoder", encoder)
        ratio = fraction("SimMIM", "masking_ratio", masking_ratio)
        with as_value_error("SimMIM"):
            super().__init__(encoder, name, side, chans, mask_ratio=ratio)
