"""vit-pytorch's ``vit_pytorch.na_vit_nested_tensor.NaViT`` as vitlab's :class:`~vitlab.models.navit.NaViT`."""
from __future__ import annotations

from typing import Callable, Union

from vitlab.compat.vit_pytorch._args import Size, classes, dropouts, head_dim, mlp_ratio
from vitlab.models.navit import NaViT as _NaViT

__all__ = ["NaViT"]


class NaViT(_NaViT):
    """NaViT ("Patch n' Pack", Dehghani et al., NeurIPS 2023) with the arguments of vit-pytorch's nested-tensor
    variant: as :class:`~vitlab.compat.vit_pytorch.na_vit.NaViT`'s, plus ``qk_rmsnorm`` -> QK normalisation on or
    off (vit-pytorch normalises with a bias-free LayerNorm despite the name; vitlab with a LayerNorm, sec. 2.1).
    ``forward`` (vitlab's NaViT's) takes vit-pytorch's list of ``(C, H, W)`` images of any sizes up to
    ``image_size`` and returns one prediction per image, in order: it packs them first fit into sequences as
    long as the largest image (sec. 2.3) with the block-diagonal mask keeping images apart, so each prediction
    is the image's alone, as with vit-pytorch's one jagged sequence per image.  Token dropping keeps
    ``round((1 - p) n)`` tokens (vit-pytorch: ``max(1, int((1 - p) n))``).

    Follows the paper where vit-pytorch does not (see :mod:`vitlab.models.navit`): a linear patch embedding without
    LayerNorms (``2 * patch_dim + 2 * dim`` fewer), LayerNorms and Linears with biases (block norms, qkv, output
    projection, qk-norm, final norm), and the masked MAP head (one latent query, attention with biases, LayerNorm
    and MLP; vit-pytorch: a query, a bias-free attention, a bias-free LayerNorm and a bias-free head)."""

    def __init__(self, *, image_size: Size, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
                 qk_rmsnorm: bool = True, token_dropout_prob: Union[None, float, Callable[[int, int], float]] = None):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        super().__init__(img_size=max(size), patch_size=patch_size, max_img_size=size,
                         num_classes=classes("NaViT", num_classes), embed_dim=dim, depth=depth, num_heads=heads,
                         mlp_ratio=mlp_ratio("NaViT", mlp_dim, dim), in_chans=channels,
                         mixer_kwargs=dict(qk_norm=bool(qk_rmsnorm), **head_dim("NaViT", dim, heads, dim_head)),
                         token_drop=token_dropout_prob or 0.0, **dropouts("NaViT", dropout, emb_dropout))
        self.pos_drop.p, self.head_drop.p = emb_dropout, 0.0  # vit-pytorch: emb_dropout, no head dropout

