"""Argument mapping shared by the vit-pytorch compatible classes: vit-pytorch's names -> vitlab's.

Every argument is mapped explicitly; one vitlab cannot honour raises a one-line ``ValueError`` naming it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from torch import nn

from vitlab.errors import UserError
from vitlab.models.backbone import Backbone

Size = Union[int, Tuple[int, int]]


def refuse(cls: str, arg: str, value: Any, expected: str) -> ValueError:
    """The one-line error for an argument vitlab cannot honour."""
    return ValueError(f"{cls}: {arg}={value!r} is not supported by vitlab; expected {expected}")


def mlp_ratio(cls: str, mlp_dim: int, dim: int) -> float:
    """``mlp_dim / dim`` nudged by half a unit, so that ``int(dim * ratio)`` (how vitlab sizes the MLP) is
    exactly ``mlp_dim`` despite float rounding."""
    if mlp_dim < 1 or dim < 1:
        raise ValueError(f"{cls}: mlp_dim={mlp_dim} and dim={dim} must be positive")
    return (mlp_dim + 0.5) / dim


def head_dim(cls: str, dim: int, heads: int, dim_head: int, per_head: bool = True) -> Dict[str, Any]:
    """``mixer_kwargs`` for vit-pytorch's ``dim_head``: none when ``heads * dim_head == dim`` (vitlab's default
    split), else ``head_dim`` (``per_head=False``: the family builds some attention without it, so refuse)."""
    if heads < 1 or dim_head < 1:
        raise ValueError(f"{cls}: heads={heads} and dim_head={dim_head} must be positive")
    if heads * dim_head == dim:
        return {}
    if not per_head:
        raise refuse(cls, "dim_head", dim_head, f"heads * dim_head == dim ({dim // heads} for dim={dim}, "
                     f"heads={heads}) in this family")
    return dict(head_dim=dim_head)


def pool_kwargs(cls: str, pool: str, class_token_with_mean: bool) -> Dict[str, Any]:
    """``pool='cls'|'mean'`` -> ``global_pool`` (+ ``class_token``: vit-pytorch's ``vit.py`` drops the class
    token under mean pooling, its other ViTs keep it)."""
    if pool == "cls":
        return dict(global_pool="token", class_token=True)
    if pool == "mean":
        return dict(global_pool="avg", class_token=class_token_with_mean)
    raise ValueError(f"{cls}: pool={pool!r}; expected 'cls' or 'mean'")


def classes(cls: str, num_classes: int) -> int:
    """vit-pytorch returns every token when ``num_classes == 0``; vitlab's forward pools, so refuse it."""
    if num_classes < 1:
        raise refuse(cls, "num_classes", num_classes, "a positive class count (for the tokens without a head, "
                     "call model.forward_features(img) on a model with a head)")
    return num_classes


def dropouts(cls: str, dropout: float, emb_dropout: float) -> Dict[str, float]:
    """vit-pytorch's ``dropout`` is on the attention probabilities, the attention output and both MLP layers:
    vitlab's ``attn_drop_rate`` and ``drop_rate``; ``emb_dropout`` is set by :func:`set_embedding_dropout`."""
    for name, p in (("dropout", dropout), ("emb_dropout", emb_dropout)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{cls}: {name}={p} must be in [0, 1)")
    return dict(drop_rate=dropout, attn_drop_rate=dropout)


def set_embedding_dropout(model: nn.Module, emb_dropout: float) -> None:
    """vitlab's ``drop_rate`` also sets the dropout after the position table and before the head; vit-pytorch
    has ``emb_dropout`` after the table and no head dropout."""
    model.pos_drop.p = emb_dropout
    if hasattr(model, "head_drop"):
        model.head_drop.p = 0.0


def vit_kwargs(cls: str, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
               mlp_dim: int, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
               emb_dropout: float = 0.0, class_token_with_mean: bool = True,
               extra_mixer: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """vit-pytorch's ViT arguments as :class:`~vitlab.models.vit.VisionTransformer` arguments."""
    return dict(img_size=image_size, patch_size=patch_size, num_classes=classes(cls, num_classes), embed_dim=dim,
                depth=depth, num_heads=heads, mlp_ratio=mlp_ratio(cls, mlp_dim, dim), in_chans=channels,
                mixer_kwargs={**head_dim(cls, dim, heads, dim_head), **(extra_mixer or {})},
                **pool_kwargs(cls, pool, class_token_with_mean), **dropouts(cls, dropout, emb_dropout))


def layerscale_init(depth: int) -> float:
    """CaiT's LayerScale initialisation by depth ("Going deeper with Image Transformers", Touvron et al., ICCV
    2021, sec. 3.1): 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


# -- the encoder checks the self-supervised wrappers (mae, simmim, mpp, mp3, dino) share ---------------------------
def encoder_input(cls: str, arg: str, encoder: nn.Module) -> Tuple[str, int, int]:
    """``(name, image side, channels)`` of a vitlab encoder, read from its ``pretrained_cfg`` (timm's
    ``input_size``); a non-vitlab module or a non-square input is refused."""
    if not isinstance(encoder, Backbone):
        raise refuse(cls, arg, type(encoder).__name__, "a vitlab transformer (e.g. vitlab.compat.vit_pytorch.ViT)")
    grid = tuple(getattr(encoder, "grid_size", ()))
    if len(set(grid)) > 1:
        raise refuse(cls, f"{arg} with a {grid[0]}x{grid[1]} patch grid", "non-square", "a square image_size")
    chans, side, _ = encoder.pretrained_cfg["input_size"]
    return encoder.name, int(side), int(chans)


def fraction(cls: str, arg: str, value: float) -> float:
    """vit-pytorch's ratios must lie strictly between 0 and 1 (it asserts so)."""
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{cls}: {arg}={value!r}; expected a fraction strictly between 0 and 1")
    return float(value)


@contextmanager
def as_value_error(cls: str) -> Iterator[None]:
    """vitlab's methods refuse an encoder with a :class:`UserError` (the CLI's one-line error); compat raises
    ``ValueError`` like the other compat classes."""
    try:
        yield
    except UserError as exc:
        raise ValueError(f"{cls}: {exc}") from None
