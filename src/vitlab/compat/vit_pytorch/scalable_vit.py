"""vit-pytorch's ``vit_pytorch.scalable_vit.ScalableViT`` as vitlab's :class:`~vitlab.models.scalablevit.ScalableViT`."""
from __future__ import annotations

from typing import Any, Tuple

from vitlab.compat.vit_pytorch._args import classes, refuse
from vitlab.models.scalablevit import ScalableViT as _ScalableViT

__all__ = ["ScalableViT"]


def _per_stage(value: Any, n: int, what: str) -> Tuple[Any, ...]:
    """vit-pytorch's ``cast_tuple(value, n)``: one value per stage."""
    t = value if isinstance(value, tuple) else (value,) * n
    if len(t) != n:
        raise ValueError(f"ScalableViT: {what}={value!r} needs {n} values (one per stage)")
    return t


class ScalableViT(_ScalableViT):
    """ScalableViT ("ScalableViT: Rethinking the Context-oriented Generalization of Vision Transformer", Yang et
    al., ECCV 2022) with vit-pytorch's arguments: ``dim`` (doubled per stage) -> ``embed_dims``, ``depth`` (vit-
    pytorch's layers, each an SSA and an IWSA block) -> ``depths = 2 * depth``, ``heads`` -> ``num_heads``,
    ``reduction_factor`` -> ``sr_ratios``, ``ssa_dim_key`` -> ``c_ratios = ssa_dim_key * heads / dim``,
    ``window_size`` -> ``wss`` (None: one window over the map), ``ff_expansion_factor`` -> ``mlp_ratio``,
    ``dropout`` -> ``attn_drop_rate`` and ``drop_rate``, ``channels`` -> ``in_chans``; ``ssa_dim_value``,
    ``iwsa_dim_key`` and ``iwsa_dim_value`` must be ``dim / heads`` (the paper's); any input size.

    Follows the paper (and official code) where vit-pytorch does not: each stage starts with the IWSA block and
    a PEG follows its first block (vit-pytorch: SSA first, PEG after the first layer's FFN); SSA reduces the
    keys/values with a depthwise ``r x r`` conv + 1x1 conv + LayerNorm + GELU, then ``k``/``v`` Linears
    (vit-pytorch: one strided ``r x r`` conv each); the LIM is a depthwise 3x3 conv (vit-pytorch: a full conv);
    qkv biases; LayerNorms after the stem and each downsampling conv, none at the end of the stages; the
    official head (final LayerNorm, mean, Linear 4096 -> LayerNorm -> GELU -> Linear; vit-pytorch: mean,
    LayerNorm, Linear).
    """

    def __init__(self, *, num_classes: int, dim: int, depth: Tuple[int, ...], heads, reduction_factor,
                 window_size=None, iwsa_dim_key=32, iwsa_dim_value=32, ssa_dim_key=32, ssa_dim_value=32,
                 ff_expansion_factor: int = 4, channels: int = 3, dropout: float = 0.0):
        if not isinstance(depth, tuple):
            raise ValueError(f"ScalableViT: depth={depth!r} must be a tuple of stage depths (as vit-pytorch)")
        n = len(depth)
        dims = tuple(dim * 2 ** i for i in range(n))
        heads = _per_stage(heads, n, "heads")
        srs, wss = _per_stage(reduction_factor, n, "reduction_factor"), _per_stage(window_size, n, "window_size")
        widths = tuple(c // h for c, h in zip(dims, heads))
        for name, value in (("ssa_dim_value", ssa_dim_value), ("iwsa_dim_key", iwsa_dim_key),
                            ("iwsa_dim_value", iwsa_dim_value)):
            if any(d * h != c for d, h, c in zip(_per_stage(value, n, name), heads, dims)):
                raise refuse("ScalableViT", name, value, f"dim / heads per stage, {widths} (the paper's head width)")
        if 1 in wss:
            raise refuse("ScalableViT", "window_size", window_size, "windows larger than 1 or None (1 would make "
                         "every block SSA in vitlab's and the official code's convention)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ScalableViT: dropout={dropout} must be in [0, 1)")
        keys = _per_stage(ssa_dim_key, n, "ssa_dim_key")
        super().__init__(num_classes=classes("ScalableViT", num_classes), embed_dims=dims,
                         depths=tuple(2 * d for d in depth), num_heads=heads, sr_ratios=srs, wss=wss,
                         c_ratios=tuple(k * h / c for k, h, c in zip(keys, heads, dims)),
                         mlp_ratio=ff_expansion_factor, in_chans=channels, attn_drop_rate=dropout, drop_rate=dropout,
                         dynamic_img_size=True)
