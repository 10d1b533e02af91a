"""vit-pytorch's ``vit_pytorch.vit_for_small_dataset`` (``ViT`` with SPT and LSA, and the standalone ``SPT``)."""
from __future__ import annotations

import torch

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.layers.spt import ShiftedPatchTokenization
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT", "SPT"]


class ViT(VisionTransformer):
    """The ViT of "Vision Transformer for Small-Size Datasets" (Lee, Lee & Song, 2021, sec. 3) with vit-pytorch's
    arguments (mapped as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s; ``pool='mean'`` keeps the class token):
    shifted patch tokenization (``embed="spt"``, sec. 3.1) and locality self-attention (``modifiers=("lsa",)``:
    diagonal masking and a learned temperature, sec. 3.2), no qkv bias and LayerNorm eps 1e-5 (the official
    code's).  The architecture is vit-pytorch's except LSA's temperature: one per head, as the official code
    (vit-pytorch: one per block, ``heads - 1`` parameters fewer per block).  Mean pooling averages the patch tokens
    only (vit-pytorch also averages in the class token)."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0):
        kw = vit_kwargs("vit_for_small_dataset.ViT", image_size, patch_size, num_classes, dim, depth, heads,
                        mlp_dim, pool, channels, dim_head, dropout, emb_dropout)
        super().__init__(embed="spt", modifiers=("lsa",), qkv_bias=False, norm_eps=1e-5,
                         architecture="vit_small_data", **kw)
        set_embedding_dropout(self, emb_dropout)


class SPT(ShiftedPatchTokenization):
    """Shifted patch tokenization on its own (Lee et al., 2021, sec. 3.1) with vit-pytorch's arguments:
    ``(B, C, H, W)`` (any size divisible by ``patch_size``) -> ``(B, N, dim)`` tokens."""

    def __init__(self, *, dim: int, patch_size: int, channels: int = 3):
        super().__init__(patch_size, patch_size, channels, dim, dynamic_img_size=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]  # the tokens, without their grid
