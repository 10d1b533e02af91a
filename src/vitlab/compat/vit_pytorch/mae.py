"""vit-pytorch's ``vit_pytorch.mae.MAE`` on vitlab's MAE (:class:`vitlab.pretrain.mae.MAE`)."""
from __future__ import annotations

from torch import nn

from vitlab.compat.vit_pytorch._args import as_value_error, encoder_input, fraction, refuse
from vitlab.pretrain.mae import MAE as _MAE

__all__ = ["MAE"]


class MAE(_MAE):
    """MAE ("Masked Autoencoders Are Scalable Vision Learners", He et al., CVPR 2022, sec. 3) with vit-pytorch's
    arguments: ``mae = MAE(encoder=v, masking_ratio=0.75, decoder_dim=512, decoder_depth=6); loss = mae(images)``.

    Mapping: ``encoder`` -> the encoder (a vitlab transformer whose stem keeps patches apart, e.g.
    ``vitlab.compat.vit_pytorch.ViT``; it is trained in place), ``masking_ratio`` -> ``mask_ratio``,
    ``decoder_dim`` / ``decoder_depth`` / ``decoder_heads`` -> the decoder's width, depth and heads (MLP
    ``4 * decoder_dim``, as both); ``decoder_dim_head`` -> ``decoder_head_dim`` (the attention's width is
    ``decoder_heads * decoder_dim_head``, projected back to ``decoder_dim``, as vit-pytorch's).
    ``forward(images)`` returns the loss; ``last`` holds the prediction (every patch), target and mask (1 = removed).

    Follows the paper (facebookresearch/mae) where vit-pytorch does not:

    * the class token runs through the encoder with the kept patches and into the decoder (vit-pytorch drops it);
    * the decoder's positions are the fixed 2-D sin-cos table (vit-pytorch: a learned ``nn.Embedding``), its qkv
      projections have biases, its input embedding is a Linear even when the widths agree, its mask token starts
      at N(0, 0.02) (vit-pytorch: ``randn``);
    * ``int(L * (1 - masking_ratio))`` patches are kept (vit-pytorch masks ``int(L * masking_ratio)``: one patch
      more is masked when ``L * masking_ratio`` is not whole).
    The loss is the same: the mean squared error over the removed patches only, on the pixels as given (set
    ``mae.norm_pix_loss = True`` for the paper's per-patch normalised target, sec. 3 "Reconstruction target").
    """

    def __init__(self, *, encoder: nn.Module, decoder_dim: int, masking_ratio: float = 0.75, decoder_depth: int = 1,
                 decoder_heads: int = 8, decoder_dim_head: int = 64):
        name, side, chans = encoder_input("MAE", "encoder", encoder)
        ratio = fraction("MAE", "masking_ratio", masking_ratio)
        if min(decoder_dim, decoder_depth, decoder_heads, decoder_dim_head) < 1:
            raise ValueError(f"MAE: decoder_dim={decoder_dim}, decoder_depth={decoder_depth}, decoder_heads="
                             f"{decoder_heads} and decoder_dim_head={decoder_dim_head} must be positive")
        with as_value_error("MAE"):
            super().__init__(encoder, name, side, chans, mask_ratio=ratio, norm_pix_loss=False,
                             decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads,
                             decoder_head_dim=decoder_dim_head)
