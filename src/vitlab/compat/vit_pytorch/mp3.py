"""vit-pytorch's ``vit_pytorch.mp3`` (``ViT``, ``MP3``) on vitlab's SimpleViT and masked position prediction
(:class:`vitlab.pretrain.mp3.MP3`)."""
from __future__ import annotations

from torch import nn

from vitlab.compat.vit_pytorch._args import (Size, as_value_error, encoder_input, fraction, set_embedding_dropout,
                                             vit_kwargs)
from vitlab.models.vit_variants import SimpleViT
from vitlab.pretrain.mp3 import MP3 as _MP3

__all__ = ["ViT", "MP3"]


class ViT(SimpleViT):
    """The encoder of vit-pytorch's ``mp3.py``: a SimpleViT ("Better plain ViT baselines for ImageNet-1k", Beyer,
    Zhai & Kolesnikov, 2022, sec. 2: no class token, global average pooling) with vit-pytorch's arguments, mapped
    as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s (``dropout`` -> ``drop_rate`` and ``attn_drop_rate``; no
    embedding dropout).

    The position table is **learned** (vit-pytorch's ``mp3.ViT``: fixed 2-D sin-cos): MP3 pretrains without
    positions and the paper adds them back for fine-tuning ("Position Prediction as an Effective Pretraining
    Strategy", Zhai et al., ICML 2022, sec. 3), so :class:`MP3` zeroes and freezes the table and fine-tuning
    learns it from zero.  As vitlab's ViT: one linear patch embedding (no patch LayerNorms), qkv biases; the final
    LayerNorm acts on the tokens before pooling (vit-pytorch: after, in its head)."""

    def __init__(self, *, num_classes: int, image_size: Size, patch_size: Size, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0):
        super().__init__(**vit_kwargs("ViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, "mean",
                                      channels, dim_head, dropout, 0.0, class_token_with_mean=False),
                         pos_embed="learned")
        set_embedding_dropout(self, 0.0)


class MP3(_MP3):
    """Masked position prediction (Zhai et al., ICML 2022, sec. 3) with vit-pytorch's arguments:
    ``mp3 = MP3(vit=v, masking_ratio=0.75); loss = mp3(images)``.

    Mapping: ``vit`` -> the encoder (an isotropic vitlab transformer with a patchify stem and a learned or no
    position table, e.g. :class:`ViT` above; trained in place, its position table zeroed and frozen),
    ``masking_ratio`` -> ``mask_ratio``: ``L - int(L * masking_ratio)`` patches per image are the context (keys
    and values), as in vit-pytorch.  ``forward(images)`` returns the loss, the position cross-entropy over every
    patch; ``last`` holds the logits and the context (key) mask.

    Where vitlab differs from vit-pytorch: every layer's keys and values are that layer's context tokens (a key
    mask in every attention, :mod:`vitlab.pretrain.mp3`), where vit-pytorch's every layer attends to the context's
    patch *embeddings* (its cross-attention context is never updated); the position head is one Linear on the
    encoder's final-normalised tokens (vit-pytorch: LayerNorm + Linear on un-normalised tokens, ``2 * dim``
    parameters more)."""

    def __init__(self, vit: nn.Module, masking_ratio: float):
        name, side, chans = encoder_input("MP3", "vit", vit)
        ratio = fraction("MP3", "masking_ratio", masking_ratio)
        with as_value_error("MP3"):
            super().__init__(vit, name, side, chans, mask_ratio=ratio)
