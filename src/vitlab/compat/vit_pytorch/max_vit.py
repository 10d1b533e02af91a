"""vit-pytorch's ``vit_pytorch.max_vit.MaxViT`` as vitlab's :class:`~vitlab.models.maxvit.MaxViT`."""
from __future__ import annotations

from typing import Optional, Sequence

from vitlab.compat.vit_pytorch._args import classes, dropouts, refuse
from vitlab.models.maxvit import MaxViT as _MaxViT

__all__ = ["MaxViT"]


class MaxViT(_MaxViT):
    """MaxViT ("MaxViT: Multi-Axis Vision Transformer", Tu et al., ECCV 2022) with vit-pytorch's arguments:
    ``dim`` -> stage widths ``dim * 2**i``, ``depth`` (a tuple, MaxViT blocks per stage) -> ``depths``,
    ``dim_head``, ``dim_conv_stem`` (default ``dim``) -> ``stem_width``, ``window_size`` -> both the block
    window ``P`` and the grid ``G``, ``mbconv_expansion_rate`` -> ``expand_ratio``, ``mbconv_shrinkage_rate`` ->
    ``se_ratio``, ``dropout`` -> ``attn_drop_rate`` and ``proj_drop_rate`` (attention probabilities, attention
    output, MLP), ``channels`` -> ``in_chans``.  vitlab builds the windows for one input size: ``image_size``
    (vitlab's addition, default 224; vit-pytorch takes any multiple of ``32 * window_size``; vitlab zero-pads
    a map the windows do not tile).

    Follows the paper and the official code where vit-pytorch does not: the stem has BatchNorm + GELU between
    its convs (vit-pytorch: none); each MBConv is pre-normalised by a BatchNorm, its expansion conv has no bias
    and its projection conv no BatchNorm after it, its squeeze width is ``mbconv_shrinkage_rate`` times the
    *output* width and its squeeze convs have biases (vit-pytorch: times the expanded width, no biases), and a
    strided MBConv keeps a shortcut (2x2 average pooling + 1x1 conv; vit-pytorch drops the residual there);
    qkv and output projections have biases (vit-pytorch: none); GELU is tanh-approximated and convs pad as
    TensorFlow's SAME (the released models); the head is LayerNorm, Linear + tanh pre-logits of the last width,
    classifier (the official ``representation_size``; vit-pytorch: LayerNorm, classifier).
    """

    def __init__(self, *, num_classes: int, dim: int, depth: Sequence[int], dim_head: int = 32,
                 dim_conv_stem: Optional[int] = None, window_size: int = 7, mbconv_expansion_rate: float = 4,
                 mbconv_shrinkage_rate: float = 0.25, dropout: float = 0.1, channels: int = 3,
                 image_size: int = 224):
        if not isinstance(depth, (tuple, list)) or not depth:
            raise refuse("MaxViT", "depth", depth, "a tuple of MaxViT block counts, one per stage")
        drops = dropouts("MaxViT", dropout, 0.0)
        super().__init__(img_size=image_size, in_chans=channels, num_classes=classes("MaxViT", num_classes),
                         embed_dim=tuple(dim * 2 ** i for i in range(len(depth))), depths=tuple(depth),
                         stem_width=dim_conv_stem or dim, dim_head=dim_head, window_size=window_size,
                         grid_size=window_size, expand_ratio=mbconv_expansion_rate, se_ratio=mbconv_shrinkage_rate,
                         head_hidden_size=dim * 2 ** (len(depth) - 1), attn_drop_rate=drops["attn_drop_rate"],
                         proj_drop_rate=drops["drop_rate"], drop_path_rate=0.0)
