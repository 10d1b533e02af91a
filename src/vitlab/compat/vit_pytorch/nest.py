"""vit-pytorch's ``vit_pytorch.nest.NesT`` as vitlab's :class:`~vitlab.models.nest.Nest`."""
from __future__ import annotations

from typing import Tuple, Union

from vitlab.compat.vit_pytorch._args import classes, dropouts, refuse
from vitlab.models.nest import Nest

__all__ = ["NesT"]


class NesT(Nest):
    """NesT ("Nested Hierarchical Transformer", Zhang et al., AAAI 2022) with vit-pytorch's arguments:
    ``image_size`` -> ``img_size``, ``patch_size``, ``dim`` and ``heads`` (doubled at each level: ``dim * 2**i``,
    ``heads * 2**i``), ``num_hierarchies`` -> ``num_levels``, ``block_repeats`` (an int or one per level) ->
    ``depths``, ``mlp_mult`` -> ``mlp_ratio``, ``channels`` -> ``in_chans``, ``dropout`` -> ``attn_drop_rate``
    and ``proj_drop_rate``; no stochastic depth (vit-pytorch has none).  ``dim_head`` is accepted and unused, as in
    vit-pytorch (both attend with ``dim / heads`` per head).

    Follows the paper where vit-pytorch does not: each level's learned position table holds a vector per token
    (vit-pytorch: one scalar per position of a block, shared by all channels and blocks); the patch embedding is
    the paper's conv (vit-pytorch: LayerNorm, 1x1 conv, LayerNorm); the aggregation is conv 3x3, LayerNorm,
    max-pool (vit-pytorch: the same); the final LayerNorm and mean as the paper; qkv biases (vit-pytorch: none).
    README configuration (NesT-T): vit-pytorch 16.5 M parameters, vitlab 17.1 M (timm's ``nest_tiny``).
    """

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, heads: int,
                 num_hierarchies: int, block_repeats: Union[int, Tuple[int, ...]], mlp_mult: float = 4,
                 channels: int = 3, dim_head: int = 64, dropout: float = 0.0):
        if image_size % patch_size:
            raise refuse("NesT", "image_size", image_size, f"a multiple of patch_size={patch_size}")
        if dim % heads:
            raise refuse("NesT", "heads", heads, f"a divisor of dim={dim}")
        n = num_hierarchies
        depths = tuple(block_repeats) if isinstance(block_repeats, (tuple, list)) else (block_repeats,) * n
        drops = dropouts("NesT", dropout, 0.0)
        del dim_head  # vit-pytorch ignores it too: its attention uses dim // heads per head
        super().__init__(img_size=image_size, in_chans=channels, patch_size=patch_size, num_levels=n,
                         embed_dims=tuple(dim * 2 ** i for i in range(n)),
                         num_heads=tuple(heads * 2 ** i for i in range(n)),
                         depths=depths, num_classes=classes("NesT", num_classes), mlp_ratio=mlp_mult,
                         proj_drop_rate=drops["drop_rate"], attn_drop_rate=drops["attn_drop_rate"], drop_path_rate=0.0)
