"""vit-pytorch's ``vit_pytorch.pit.PiT`` as vitlab's :class:`~vitlab.models.pit.PoolingVisionTransformer`."""
from __future__ import annotations

from typing import Tuple, Union

from vitlab.compat.vit_pytorch._args import classes, dropouts, mlp_ratio, refuse
from vitlab.models.pit import PoolingVisionTransformer

__all__ = ["PiT"]


class PiT(PoolingVisionTransformer):
    """PiT ("Rethinking Spatial Dimensions of Vision Transformers", Heo et al., ICCV 2021) with vit-pytorch's
    arguments: ``image_size`` -> ``img_size`` (divisible by ``patch_size``), ``patch_size`` (the stem's stride is
    ``patch_size // 2``, as vit-pytorch's unfold), ``dim`` (doubled at each pooling: ``dim * 2**i``), ``depth`` (a
    tuple, blocks per stage), ``heads`` (an int or one per stage; the stage width must divide by them),
    ``dim_head`` -> the attention's ``head_dim`` (every stage: inner width ``heads * dim_head``), ``mlp_dim`` ->
    ``mlp_ratio = mlp_dim / dim``, ``dropout`` -> ``attn_drop_rate`` and ``proj_drop_rate``, ``emb_dropout`` ->
    ``pos_drop_rate``, ``channels`` -> ``in_chans``.

    Follows the paper where vit-pytorch does not: the MLP widens with the stage (``mlp_ratio`` x width, sec. 3.4;
    vit-pytorch keeps ``mlp_dim`` in every stage); the pooling is the depthwise conv alone (vit-pytorch adds a 1x1
    conv after it); the position table covers the map only (vit-pytorch: also a class-token row); qkv biases
    (vit-pytorch: none).  README configuration (224 px, patch 14, dim 256, depth (3, 3, 3), heads 16, mlp_dim
    2048, dim_head 64): vit-pytorch 47.5 M parameters, vitlab 90.3 M (the MLPs of stages 2 and 3 widen to 4096
    and 8192).
    """

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: Tuple[int, ...],
                 heads: Union[int, Tuple[int, ...]], mlp_dim: int, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0, channels: int = 3):
        if not isinstance(depth, tuple):
            raise ValueError(f"PiT: depth={depth!r} must be a tuple, one block count per stage")
        if image_size % patch_size:
            raise refuse("PiT", "image_size", image_size, f"a multiple of patch_size={patch_size}")
        heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * len(depth)
        dims = [dim * 2 ** i for i in range(len(depth))]
        if len(heads) != len(depth) or any(d % h for d, h in zip(dims, heads)):
            raise refuse("PiT", "heads", heads, f"one per stage dividing the stage widths {tuple(dims)}")
        drops = dropouts("PiT", dropout, emb_dropout)
        # the exact ratio where it sizes stage 1 right: the wider stages multiply it
        ratio = mlp_dim / dim if int(dim * (mlp_dim / dim)) == mlp_dim else mlp_ratio("PiT", mlp_dim, dim)
        super().__init__(img_size=image_size, patch_size=patch_size, stride=patch_size // 2,
                         base_dims=tuple(d // h for d, h in zip(dims, heads)), depth=depth, heads=heads,
                         mlp_ratio=ratio, num_classes=classes("PiT", num_classes),
                         in_chans=channels, mixer_kwargs=dict(head_dim=dim_head), pos_drop_rate=emb_dropout,
                         proj_drop_rate=drops["drop_rate"], attn_drop_rate=drops["attn_drop_rate"])
