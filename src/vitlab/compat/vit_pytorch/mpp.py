"""vit-pytorch's ``vit_pytorch.mpp.MPP`` on vitlab's masked patch prediction (:class:`vitlab.pretrain.mpp.MPP`)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

from vitlab.compat.vit_pytorch._args import as_value_error, encoder_input, fraction, refuse
from vitlab.pretrain.mpp import MPP as _MPP

__all__ = ["MPP"]


def _norm_stats(channels: int, max_pixel_val: float, mean: Optional[Sequence[float]],
                std: Optional[Sequence[float]]) -> Tuple[list, list]:
    """vit-pytorch un-normalises with ``mean`` / ``std`` (only when both are given) and bins ``[0, max_pixel_val]``;
    vitlab bins ``[0, 1]``, so both statistics are divided by ``max_pixel_val``."""
    if max_pixel_val <= 0:
        raise refuse("MPP", "max_pixel_val", max_pixel_val, "a positive pixel range")
    if (mean is None) != (std is None):
        raise refuse("MPP", "mean" if std is None else "std", mean if std is None else std,
                     "mean and std given together (vit-pytorch ignores one alone)")
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise refuse("MPP", "mean/std", (mean, std), f"{channels} values each (channels={channels})")
    return [m / max_pixel_val for m in mean], [s / max_pixel_val for s in std]


class MPP(_MPP):
    """Masked patch prediction ("An Image is Worth 16x16 Words", Dosovitskiy et al., ICLR 2021, sec. 4.6 and
    appendix B.1.2) with vit-pytorch's arguments: ``MPP(transformer=model, patch_size=32, dim=1024,
    mask_prob=0.15, random_patch_prob=0.30, replace_prob=0.50)``; ``loss = mpp_trainer(images)``.

    Mapping: ``transformer`` -> the encoder (an isotropic vitlab transformer with a patchify stem, trained in
    place); ``patch_size``, ``dim`` and ``channels`` must be the encoder's; ``output_channel_bits`` -> ``bits``;
    ``mask_prob`` -> ``mask_ratio`` (``ceil(L * mask_prob)`` patches selected per image, as both);
    ``replace_prob`` / ``random_patch_prob`` -> the shares of the selected patches that become the mask patch /
    another patch of the image (the rest stay; vit-pytorch's ``random_patch_prob / (1 - replace_prob)`` draw
    gives exactly these shares), so their sum must be at most 1; ``max_pixel_val``, ``mean``, ``std`` -> the
    un-normalisation before the colour target (both statistics divided by ``max_pixel_val``).
    ``forward(images)`` returns the loss; ``last`` holds logits, targets, ``selected`` and ``kind``.

    The target and loss are vit-pytorch's: each patch's mean colour, ``output_channel_bits`` bits per channel
    (channel 0 least significant), cross-entropy over the selected patches only.  A mean lying exactly on a bin
    edge goes to the upper bin here (``floor``), to the lower one in vit-pytorch (``bucketize``), and each pixel is
    clamped to ``[0, 1]`` before the mean here (vit-pytorch clamps the mean's top only): the two differ only for
    pixels outside the range after un-normalisation.  The paper's
    proportions (sec. 4.6: 50% of the patches, 80% mask / 10% random / 10% kept) are ``mask_prob=0.5,
    replace_prob=0.8, random_patch_prob=0.1``, ``vitlab pretrain --method mpp``'s defaults; the arguments'
    defaults here are vit-pytorch's.  The encoder is vitlab's ViT (no patch LayerNorms, qkv biases).
    """

    def __init__(self, transformer: nn.Module, patch_size: int, dim: int, output_channel_bits: int = 3,
                 channels: int = 3, max_pixel_val: float = 1.0, mask_prob: float = 0.15, replace_prob: float = 0.5,
                 random_patch_prob: float = 0.5, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        name, side, chans = encoder_input("MPP", "transformer", transformer)
        patch = side // transformer.grid_size[0]
        for arg, value, own in (("patch_size", patch_size, patch), ("dim", dim, transformer.num_features),
                                ("channels", channels, chans)):
            if value != own:
                raise refuse("MPP", arg, value, f"the transformer's {own}")
        for arg, p in (("replace_prob", replace_prob), ("random_patch_prob", random_patch_prob)):
            if not 0.0 <= p <= 1.0:
                raise refuse("MPP", arg, p, "a probability in [0, 1]")
        if replace_prob + random_patch_prob > 1.0:
            raise refuse("MPP", "random_patch_prob", random_patch_prob,
                         f"at most 1 - replace_prob = {1 - replace_prob:g} (shares of the selected patches)")
        mean, std = _norm_stats(chans, max_pixel_val, mean, std)
        with as_value_error("MPP"):
            super().__init__(transformer, name, side, chans, mean, std,
                             mask_ratio=fraction("MPP", "mask_prob", mask_prob), bits=output_channel_bits,
                             replace_prob=replace_prob, random_prob=random_patch_prob)
        self.random_patch_prob = self.random_prob  # vit-pytorch's name
