"""vit-pytorch's ``vit_pytorch.vit_5.ViT`` as vitlab's :class:`~vitlab.models.vit5.ViT5`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.models.vit5 import ViT5

__all__ = ["ViT"]


class ViT(ViT5):
    """ViT-5 ("ViT-5: Vision Transformers for The Mid-2020s", Wang et al., 2026) with vit-pytorch's arguments,
    mapped as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s (class-token pooling), ``num_registers`` ->
    ``reg_tokens`` (a square number: the registers' RoPE lies on a square grid).

    Follows the paper's official code where vit-pytorch does not: the learned position table covers the patches
    only (vit-pytorch's also has rows for the class token and the registers: ``(1 + num_registers) * dim``
    parameters fewer here); the patches' 2-D RoPE has base 10000 with the first half of the pairs on the rows
    (vit-pytorch: base 100000, columns first); the registers get a 2-D RoPE on their ``sqrt(R) x sqrt(R)`` grid
    with base 100 (vit-pytorch: a 1-D RoPE over the register index); RMSNorm has eps 1e-6 (vit-pytorch:
    ``F.normalize`` times ``sqrt(dim)``); class token, registers and table start at N(0, 0.02) (vit-pytorch:
    ``randn``)."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0, num_registers: int = 4):
        kw = vit_kwargs("ViT-5", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, "cls", channels,
                        dim_head, dropout, emb_dropout)
        super().__init__(reg_tokens=num_registers, **kw)
        set_embedding_dropout(self, emb_dropout)
