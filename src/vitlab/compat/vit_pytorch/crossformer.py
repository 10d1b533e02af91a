"""vit-pytorch's ``vit_pytorch.crossformer.CrossFormer`` as vitlab's :class:`~vitlab.models.crossformer.CrossFormer`."""
from __future__ import annotations

from typing import Any, Tuple

from vitlab.compat.vit_pytorch._args import classes, refuse
from vitlab.models.crossformer import CrossFormer as _CrossFormer

__all__ = ["CrossFormer"]

_DIM_HEAD = 32  # vit-pytorch's attention: heads = dim // 32


def _four(value: Any, what: str) -> Tuple[Any, ...]:
    """vit-pytorch's ``cast_tuple(value, 4)``: one value per stage."""
    t = value if isinstance(value, tuple) else (value,) * 4
    if len(t) != 4:
        raise ValueError(f"CrossFormer: {what}={value!r} needs 4 values (one per stage)")
    return t


class CrossFormer(_CrossFormer):
    """CrossFormer ("CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", Wang et al.,
    ICLR 2022) with vit-pytorch's arguments: ``dim`` -> ``embed_dim`` (per stage), ``depth`` (vit-pytorch's layers,
    each a short- and a long-distance block) -> ``depths = 2 * depth``, heads ``dim // 32`` (vit-pytorch's
    ``dim_head``), ``local_window_size`` -> ``group_size`` (SDA), ``global_window_size`` -> ``lda_group_size``
    (the side of each LDA group, as vit-pytorch's ``l1, l2``), ``cross_embed_kernel_sizes`` -> ``patch_size`` /
    ``merge_size`` (strides must be the smallest stem kernel, then 2), ``attn_dropout`` -> ``attn_drop_rate``,
    ``ff_dropout`` -> ``drop_rate``, ``channels`` -> ``in_chans``; any input size (``dynamic_img_size``).

    Follows the paper where vit-pytorch does not: the dynamic position bias gives one bias per head from the
    official MLP (``dim/16`` wide, LayerNorm-ReLU-Linear x 3; vit-pytorch: one bias shared by all heads, a wider
    MLP), qkv biases, a LayerNorm after the stem and before each later embedding layer, a final LayerNorm
    (vit-pytorch normalises inside each attention/FFN instead and has none at the end), and LDA groups that
    cover the map when it is not larger than the group (vit-pytorch's README sizes give 1x1 groups in stage 4).
    """

    def __init__(self, *, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
                 local_window_size=7, cross_embed_kernel_sizes=((4, 8, 16, 32), (2, 4), (2, 4), (2, 4)),
                 cross_embed_strides=(4, 2, 2, 2), num_classes: int = 1000, attn_dropout: float = 0.0,
                 ff_dropout: float = 0.0, channels: int = 3):
        dims, depths = _four(dim, "dim"), _four(depth, "depth")
        kernels, strides = _four(cross_embed_kernel_sizes, "cross_embed_kernel_sizes"), _four(cross_embed_strides,
                                                                                             "cross_embed_strides")
        if any(d < _DIM_HEAD or d % _DIM_HEAD for d in dims):
            raise refuse("CrossFormer", "dim", dim, f"multiples of {_DIM_HEAD} (vit-pytorch's heads = dim // 32)")
        stem = tuple(kernels[0]) if isinstance(kernels[0], (tuple, list)) else (kernels[0],)
        if strides[0] != min(stem) or tuple(strides[1:]) != (2, 2, 2):
            raise refuse("CrossFormer", "cross_embed_strides", cross_embed_strides,
                         f"({min(stem)}, 2, 2, 2): the smallest stem kernel, then 2 (the paper's)")
        for name, p in (("attn_dropout", attn_dropout), ("ff_dropout", ff_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"CrossFormer: {name}={p} must be in [0, 1)")
        merges = tuple(tuple(k) if isinstance(k, (tuple, list)) else (k,) for k in kernels[1:])
        super().__init__(embed_dim=dims, depths=tuple(2 * d for d in depths),
                         num_heads=tuple(d // _DIM_HEAD for d in dims), group_size=_four(local_window_size,
                                                                                       "local_window_size"),
                         lda_group_size=_four(global_window_size, "global_window_size"), patch_size=stem,
                         merge_size=merges, num_classes=classes("CrossFormer", num_classes),
                         attn_drop_rate=attn_dropout, drop_rate=ff_dropout, in_chans=channels, drop_path_rate=0.0,
                         dynamic_img_size=True)
