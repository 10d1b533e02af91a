"""vit-pytorch's ``vit_pytorch.na_vit.NaViT`` as vitlab's :class:`~vitlab.models.navit.NaViT`."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from vitlab.compat.vit_pytorch._args import Size, classes, dropouts, head_dim, mlp_ratio
from vitlab.models.navit import NaViT as _NaViT, PackedBatch, pack_images

__all__ = ["NaViT"]

Images = Union[Sequence[torch.Tensor], Sequence[Sequence[torch.Tensor]]]


class NaViT(_NaViT):
    """NaViT ("Patch n' Pack", Dehghani et al., NeurIPS 2023) with vit-pytorch's arguments: ``image_size`` -> the
    largest image (``max_img_size``; it sizes the factorised position tables), ``dim``, ``depth``, ``heads``,
    ``mlp_dim``, ``channels``, ``dim_head``, ``dropout``, ``emb_dropout`` as
    :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s,
    ``token_dropout_prob`` -> ``token_drop`` (a rate or ``(H, W) -> rate``), QK normalisation on (sec. 2.1).
    ``forward`` takes vit-pytorch's inputs: a list of lists of ``(C, H, W)`` images (each inner list one packed
    sequence) or, with ``group_images=True``, a flat list packed into sequences of ``group_max_seq_len`` tokens.

    Follows the paper where vit-pytorch does not (see :mod:`vitlab.models.navit`): first-fit packing, a linear patch
    embedding without LayerNorms, LayerNorm QK normalisation (vit-pytorch: RMS), biases in every Linear, masked
    attention pooling as in the paper's MAP head (with its MLP), padding tokens that attend to padding only.  The
    prediction of an image does not depend on which sequence it is packed into (the mask keeps images apart), so
    vit-pytorch's explicit groups are re-packed first fit into sequences as long as its longest group."""

    def __init__(self, *, image_size: Size, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
                 token_dropout_prob: Union[None, float, Callable[[int, int], float]] = None):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        super().__init__(img_size=max(size), patch_size=patch_size, max_img_size=size,
                         num_classes=classes("NaViT", num_classes), embed_dim=dim, depth=depth, num_heads=heads,
                         mlp_ratio=mlp_ratio("NaViT", mlp_dim, dim), in_chans=channels,
                         mixer_kwargs=dict(qk_norm=True, **head_dim("NaViT", dim, heads, dim_head)),
                         token_drop=token_dropout_prob or 0.0, **dropouts("NaViT", dropout, emb_dropout))
        self.pos_drop.p, self.head_drop.p = emb_dropout, 0.0  # vit-pytorch: emb_dropout, no head dropout

    def forward(self, batched_images: Any, group_images: bool = False, group_max_seq_len: int = 2048
                ) -> torch.Tensor:
        """vit-pytorch's call (see the class docstring); a tensor or a :class:`PackedBatch` as vitlab's NaViT."""
        if torch.is_tensor(batched_images) or isinstance(batched_images, PackedBatch):
            return super().forward(batched_images)
        nested = [list(g) if isinstance(g, (list, tuple)) else [g] for g in batched_images]
        images: List[torch.Tensor] = [img for g in nested for img in g]
        # vit-pytorch's groups: sequences as long as the longest group (the predictions do not depend on the packing)
        max_len = group_max_seq_len if group_images else max(sum(map(self._tokens, g)) for g in nested)
        batch = self._pack(images, max_len)
        return self.forward_head(self.forward_features(batch), batch=batch)

    def _tokens(self, img: torch.Tensor) -> int:
        return (img.shape[-2] // self.patch_size) * (img.shape[-1] // self.patch_size)

    def _pack(self, images: List[torch.Tensor], max_len: Optional[int]) -> PackedBatch:
        for img in images:
            if img.ndim != 3 or img.shape[0] != self.in_chans:
                raise ValueError(f"expected (C, H, W) images with C = {self.in_chans}, got shape {tuple(img.shape)}")
        return pack_images(images, self.patch_size, max_len, self.token_drop if self.training else 0.0)
