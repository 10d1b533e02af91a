"""vit-pytorch's ``vit_pytorch.levit.LeViT`` as vitlab's :class:`~vitlab.models.levit.Levit`."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from vitlab.compat.vit_pytorch._args import classes, dropouts, refuse
from vitlab.models.levit import Levit

__all__ = ["LeViT"]

PerStage = Union[int, Sequence[int]]


def _cast(cls: str, name: str, value: PerStage, stages: int) -> Tuple[int, ...]:
    """vit-pytorch's ``cast_tuple``: one value for every stage, or a tuple padded with its last value."""
    t = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    t = t + (t[-1],) * max(stages - len(t), 0)
    if len(t) != stages:
        raise ValueError(f"{cls}: {name}={value!r} gives {len(t)} values for stages={stages}")
    return t


class LeViT(Levit):
    """LeViT ("LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", Graham et al., ICCV 2021)
    with vit-pytorch's arguments: ``image_size`` -> ``img_size``, ``dim`` / ``depth`` / ``heads`` (one value or one per
    stage, padded as vit-pytorch does) -> ``embed_dim`` / ``depth`` / ``num_heads``, ``stages`` (their count),
    ``dim_key`` -> ``key_dim``, ``dim_value`` -> ``attn_ratio = dim_value / dim_key``, ``mlp_mult`` -> ``mlp_ratio``,
    ``dropout`` -> ``attn_drop_rate`` and ``proj_drop_rate``, ``num_distill_classes`` (``None`` or ``num_classes``)
    -> ``distilled`` (in training the model returns ``(logits, distillation logits)`` as vit-pytorch's; in evaluation
    their mean, DeiT's rule, where vit-pytorch still returns both).

    Follows the paper where vit-pytorch does not (sec. 4.2): the stem's convs widen to ``dim / 8, dim / 4, dim / 2``
    with BatchNorm and hard-swish between them (vit-pytorch: 32, 64, 128 channels, no norm, no activation); every
    Linear of attention and MLP is bias-free and followed by BatchNorm (vit-pytorch's MLP has biases and no norm);
    hard-swish before the attention's output projection (vit-pytorch: GELU); the attention bias is added to the
    scaled logits (vit-pytorch divides it by the scale first: the same family of functions); the shrinking
    attention between stages has ``dim / dim_key`` heads and values ``4 * dim_key`` wide, then an MLP residual
    (vit-pytorch: twice the stage's heads, ``dim_value`` values); the same drop-path rate in every residual (none
    here: vit-pytorch has no stochastic depth).  One departure is kept: the classifier is vit-pytorch's plain
    Linear (the paper's BatchNorm before it cannot train on the batch of one of vit-pytorch's example).
    """

    def __init__(self, *, image_size: int, num_classes: int, dim: PerStage, depth: PerStage, heads: PerStage,
                 mlp_mult: int, stages: int = 3, dim_key: int = 32, dim_value: int = 64, dropout: float = 0.0,
                 num_distill_classes: Optional[int] = None):
        if stages < 1:
            raise refuse("LeViT", "stages", stages, "at least 1")
        if dim_key < 1 or dim_value < 1:
            raise ValueError(f"LeViT: dim_key={dim_key} and dim_value={dim_value} must be positive")
        if num_distill_classes not in (None, num_classes):
            raise refuse("LeViT", "num_distill_classes", num_distill_classes,
                         f"None or num_classes ({num_classes}): DeiT's distillation head predicts the same classes")
        drops = dropouts("LeViT", dropout, 0.0)
        ratio = (dim_value + 0.5) / dim_key  # half a unit more: int(dim_key * ratio) is dim_value despite rounding
        super().__init__(img_size=image_size, num_classes=classes("LeViT", num_classes),
                         embed_dim=_cast("LeViT", "dim", dim, stages), depth=_cast("LeViT", "depth", depth, stages),
                         num_heads=_cast("LeViT", "heads", heads, stages), key_dim=dim_key,
                         attn_ratio=ratio, mlp_ratio=mlp_mult, distilled=num_distill_classes is not None,
                         head_norm=False, attn_drop_rate=drops["attn_drop_rate"], proj_drop_rate=drops["drop_rate"])
        self.set_distilled_training(num_distill_classes is not None)
