"""vit-pytorch's ``vit_pytorch.sep_vit.SepViT`` as vitlab's :class:`~vitlab.models.sepvit.SepViT`."""
from __future__ import annotations

from typing import Any, Tuple, Union

from vitlab.compat.vit_pytorch._args import classes, dropouts, refuse
from vitlab.models.sepvit import SepViT as _SepViT

__all__ = ["SepViT"]


def _per_stage(name: str, value: Any, n: int) -> Tuple[Any, ...]:
    t = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(t) != n:
        raise ValueError(f"SepViT: {name}={value!r} needs one value per stage ({n} stages, from depth)")
    return t


class SepViT(_SepViT):
    """SepViT ("SepViT: Separable Vision Transformer", Li et al., 2022) with vit-pytorch's arguments: ``dim`` ->
    ``embed_dims`` (``dim * 2**i`` per stage), ``depth`` (a tuple, one per stage) -> ``depths``, ``heads`` ->
    ``num_heads``, ``window_size`` (an int or one per stage; vitlab also takes a tuple per stage, cycled over its
    blocks, e.g. ``((7,), (7, 14), (7, 14), (7,))`` for the paper's grouped self-attention), ``dim_head`` must be
    ``dim_i / heads_i`` in every stage, ``ff_mult`` -> ``mlp_ratios``, ``channels`` -> ``in_chans``, ``dropout`` ->
    ``drop_rate`` and ``attn_drop_rate``.  ``image_size`` (vitlab only, default 224): the model learns one token
    per window, so it is built for one input size (vit-pytorch takes any size whose maps the windows tile).

    Follows the paper and its official code where vit-pytorch does not: one learned window token per window
    (vit-pytorch: one vector shared by all windows); the window tokens' LayerNorm over all channels before the
    pointwise queries/keys (vit-pytorch: per head); each attention step adds its input back, as the official code;
    a LayerNorm after every patch embedding (vit-pytorch: none), no norm closing stages 1-3 (vit-pytorch: one), the
    final LayerNorm before the mean (vit-pytorch: after it); the PEG after each stage's first block (vit-pytorch:
    before the blocks); qkv biases (vit-pytorch: none); ``window_size`` is used (vit-pytorch ignores it and always
    uses 7x7 windows).  Parameter counts therefore differ.
    """

    def __init__(self, *, num_classes: int, dim: int, depth: Tuple[int, ...], heads: Union[int, Tuple[int, ...]],
                 window_size: Any = 7, dim_head: int = 32, ff_mult: float = 4, channels: int = 3,
                 dropout: float = 0.0, image_size: int = 224):
        if not isinstance(depth, tuple):
            raise ValueError(f"SepViT: depth={depth!r} must be a tuple, one block count per stage")
        n = len(depth)
        dims = tuple(dim * 2 ** i for i in range(n))
        heads = _per_stage("heads", heads, n)
        if any(d != h * dim_head for d, h in zip(dims, heads)):
            raise refuse("SepViT", "dim_head", dim_head, f"dim / heads in every stage (dims {dims}, heads {heads}): "
                         "separable attention adds its input back, so heads * dim_head must equal the stage width")
        drops = dropouts("SepViT", dropout, 0.0)
        super().__init__(img_size=image_size, in_chans=channels, num_classes=classes("SepViT", num_classes),
                         embed_dims=dims, depths=depth, num_heads=heads, mlp_ratios=(ff_mult,) * n,
                         window_size=_per_stage("window_size", window_size, n), drop_rate=drops["drop_rate"],
                         attn_drop_rate=drops["attn_drop_rate"])
