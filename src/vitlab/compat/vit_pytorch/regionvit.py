"""vit-pytorch's ``vit_pytorch.regionvit.RegionViT`` as vitlab's :class:`~vitlab.models.regionvit.RegionViT`."""
from __future__ import annotations

from typing import Sequence, Union

from vitlab.compat.vit_pytorch._args import classes, refuse
from vitlab.models.regionvit import RegionViT as _RegionViT

__all__ = ["RegionViT"]

HEAD_DIM = 32  # the paper's head width in every stage (Table 1: 2/4/8/16 heads at widths 64..512)


def _four(cls: str, name: str, value: Union[int, Sequence[int]]) -> tuple:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 4
    if len(value) != 4:
        raise ValueError(f"{cls}: {name}={value!r} needs one value or 4 (one per stage)")
    return value


class RegionViT(_RegionViT):
    """RegionViT ("RegionViT: Regional-to-Local Attention for Vision Transformers", Chen et al., ICLR 2022) with
    vit-pytorch's arguments: ``dim`` -> ``embed_dims``, ``depth`` -> ``depths``, ``window_size``,
    ``num_classes``, ``tokenize_local_3_conv`` -> ``stem`` (``3conv`` | ``1conv``), ``attn_dropout`` ->
    ``attn_drop_rate``, ``ff_dropout`` -> ``drop_rate``, ``channels`` -> ``in_chans``; ``local_patch_size`` must be
    4 and ``use_peg`` False (vit-pytorch's PEG is not the official detection PEG).  Heads: ``dim / 32`` per stage.

    Follows the paper and its official code where vit-pytorch does not: heads of width 32 per stage (vit-pytorch:
    4 heads of 32 in every stage, an inner width of 128 whatever ``dim``), qkv biases, separate norms for the
    regional and the local attention (vit-pytorch: one), a relative position table per block (vit-pytorch: one per
    stage), the downsampler is LayerNorm + GELU + a depthwise stride-2 conv (vit-pytorch: a full 3x3 conv), the
    3-conv stem widens C/4, C/2, C (vit-pytorch: C, C, C), and the head normalises the regional tokens before
    averaging them (vit-pytorch: after).  Output shapes are vit-pytorch's.
    """

    def __init__(self, *, dim: Union[int, Sequence[int]] = (64, 128, 256, 512),
                 depth: Union[int, Sequence[int]] = (2, 2, 8, 2), window_size: int = 7, num_classes: int = 1000,
                 tokenize_local_3_conv: bool = False, local_patch_size: int = 4, use_peg: bool = False,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0, channels: int = 3):
        dims, depths = _four("RegionViT", "dim", dim), _four("RegionViT", "depth", depth)
        if local_patch_size != 4:
            raise refuse("RegionViT", "local_patch_size", local_patch_size, "4 (the paper's stride-4 local stem)")
        if use_peg:
            raise refuse("RegionViT", "use_peg", use_peg, "False")
        if any(d % HEAD_DIM for d in dims):
            raise refuse("RegionViT", "dim", dim, f"widths divisible by {HEAD_DIM} (the paper's head width)")
        region = 4 * window_size * 8
        super().__init__(img_size=region * max(1, round(224 / region)), in_chans=channels,
                         num_classes=classes("RegionViT", num_classes), embed_dims=dims, depths=depths,
                         num_heads=tuple(d // HEAD_DIM for d in dims), window_size=window_size,
                         stem="3conv" if tokenize_local_3_conv else "1conv", attn_drop_rate=attn_dropout,
                         drop_rate=ff_dropout, drop_path_rate=0.0)
