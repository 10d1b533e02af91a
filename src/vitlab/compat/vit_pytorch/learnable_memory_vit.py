"""vit-pytorch's ``vit_pytorch.learnable_memory_vit`` (``ViT`` and ``Adapter``) on vitlab's ViT and
:class:`~vitlab.models.memory.MemoryAdapter`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import Size, classes, set_embedding_dropout, vit_kwargs
from vitlab.models.memory import MemoryAdapter
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT", "Adapter"]


class ViT(VisionTransformer):
    """The backbone of "Fine-tuning Image Transformers using Learnable Memory" (Sandler et al., CVPR 2022): a plain
    ViT with vit-pytorch's arguments (as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s; ``pool='mean'`` keeps the
    class token).  Follows the paper (ViT) where vit-pytorch does not: a linear patch embedding (vit-pytorch adds
    LayerNorms before and after it: ``2 * patch_dim + 2 * dim`` parameters fewer here) and qkv biases
    (``3 * heads * dim_head`` more per block)."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0):
        kw = vit_kwargs("learnable_memory_vit.ViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                        pool, channels, dim_head, dropout, emb_dropout)
        super().__init__(**kw)
        set_embedding_dropout(self, emb_dropout)


class Adapter(MemoryAdapter):
    """A new task on a frozen ``vit`` (Sandler et al., CVPR 2022, sec. 3.2) with vit-pytorch's arguments:
    ``num_memories_per_layer`` -> ``num_memory``; a new class token, memory tokens per block and a new head.

    Differs from vit-pytorch's by design: the new head is the backbone's final norm (shared, frozen) plus a new
    Linear (vit-pytorch: a new LayerNorm + Linear, ``2 * dim`` parameters more), the new class token starts from
    the frozen one, and :meth:`forward_both` gives the old task's logits from the same forward."""

    def __init__(self, *, vit: VisionTransformer, num_memories_per_layer: int = 10, num_classes: int = 2):
        super().__init__(vit, num_memories_per_layer, classes("Adapter", num_classes))
