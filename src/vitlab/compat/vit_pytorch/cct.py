"""vit-pytorch's ``vit_pytorch.cct`` (``CCT`` and ``cct_2`` ... ``cct_16``) as vitlab's
:class:`~vitlab.models.cct.CCT`."""
from __future__ import annotations

from typing import Any, Optional

from vitlab.compat.vit_pytorch._args import Size, classes, refuse
from vitlab.models.cct import CCT as _CCT

__all__ = ["CCT", "cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14", "cct_16"]

_POSITIONS = {"learnable": "learned", "sine": "sincos_1d", "none": "none"}


class CCT(_CCT):
    """CCT ("Escaping the Big Data Paradigm with Compact Transformers", Hassani et al., 2021) with vit-pytorch's
    (the official code's) arguments: ``img_size``, ``embedding_dim`` -> ``embed_dim``, ``n_input_channels`` ->
    ``in_chans``, ``n_conv_layers``, ``kernel_size``, ``stride``, ``padding``, ``pooling_kernel_size``,
    ``pooling_stride``, ``pooling_padding`` -> the tokenizer's (``patch_size`` its total stride), ``num_layers`` ->
    ``depth``, ``num_heads``, ``mlp_ratio``, ``dropout_rate`` -> ``drop_rate`` (no head dropout),
    ``attention_dropout`` -> ``attn_drop_rate``, ``stochastic_depth_rate`` -> ``drop_path_rate``,
    ``positional_embedding`` ``'learnable' | 'sine' | 'none'`` -> ``pos_embed`` ``'learned' | 'sincos_1d' | 'none'``,
    ``seq_pool=False`` -> a class token and ``global_pool='token'``.

    Follows the paper where vit-pytorch (copying the official code) does not: plain pre-norm blocks (sec. 3, Fig. 2;
    the official block normalises the stream between its halves), the same parameters.  The fixed sinusoid is a
    buffer (vit-pytorch: a frozen Parameter, counted by ``parameters()``)."""

    def __init__(self, img_size: Size = 224, embedding_dim: int = 768, n_input_channels: int = 3,
                 n_conv_layers: int = 1, kernel_size: int = 7, stride: int = 2, padding: int = 3,
                 pooling_kernel_size: int = 3, pooling_stride: int = 2, pooling_padding: int = 1,
                 dropout_rate: float = 0.0, attention_dropout: float = 0.1, stochastic_depth_rate: float = 0.1,
                 num_layers: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 positional_embedding: str = "sine", seq_pool: bool = True, **unknown: Any):
        if unknown:
            raise refuse("CCT", next(iter(unknown)), next(iter(unknown.values())), "one of CCT's arguments")
        if positional_embedding not in _POSITIONS:
            raise ValueError(f"CCT: positional_embedding={positional_embedding!r}; expected one of {tuple(_POSITIONS)}")
        tokenizer = dict(stride=stride, padding=padding, pooling_kernel_size=pooling_kernel_size,
                         pooling_stride=pooling_stride, pooling_padding=pooling_padding)
        super().__init__(kernel_size=kernel_size, n_conv_layers=n_conv_layers,
                         patch_size=(stride * pooling_stride) ** n_conv_layers, embed_kwargs=tokenizer,
                         img_size=img_size, in_chans=n_input_channels, embed_dim=embedding_dim, depth=num_layers,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=classes("CCT", num_classes),
                         pos_embed=_POSITIONS[positional_embedding], class_token=not seq_pool,
                         global_pool="seqpool" if seq_pool else "token", qkv_bias=False, norm_eps=1e-5,
                         drop_rate=dropout_rate, attn_drop_rate=attention_dropout,
                         drop_path_rate=stochastic_depth_rate)
        self.head_drop.p = 0.0  # the official classifier has no dropout before its head


# vit-pytorch's (and the official) sizes: blocks, heads, MLP ratio, width
CCT_SIZES = {"cct_2": (2, 2, 1, 128), "cct_4": (4, 2, 1, 128), "cct_6": (6, 4, 2, 256), "cct_7": (7, 4, 2, 256),
             "cct_8": (8, 4, 2, 256), "cct_14": (14, 6, 3, 384), "cct_16": (16, 6, 3, 384)}


def cct_variant(cls, name: str):
    """The official ``cct_N`` factory for ``cls`` (the 2-D or the 3-D CCT): stride and padding default to
    ``max(1, k // 2 - 1)`` and ``max(1, k // 2)`` for the kernel size ``k`` (default 3)."""
    num_layers, num_heads, mlp_ratio, embedding_dim = CCT_SIZES[name]

    def make(kernel_size: int = 3, stride: Optional[int] = None, padding: Optional[int] = None, **kwargs: Any):
        stride = max(1, kernel_size // 2 - 1) if stride is None else stride
        padding = max(1, kernel_size // 2) if padding is None else padding
        return cls(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, embedding_dim=embedding_dim,
                   kernel_size=kernel_size, stride=stride, padding=padding, **kwargs)

    make.__name__ = make.__qualname__ = name
    return make


cct_2, cct_4, cct_6, cct_7, cct_8, cct_14, cct_16 = (cct_variant(CCT, n) for n in CCT_SIZES)
