"""vit-pytorch's ``vit_pytorch.cct_3d`` (``CCT`` and ``cct_2`` ... ``cct_16``) as vitlab's
:class:`~vitlab.models.cct.CCT` with the 3-D tokenizer (``embed="cct3d"``)."""
from __future__ import annotations

from typing import Any, Optional

from vitlab.compat.vit_pytorch._args import Size, classes, refuse
from vitlab.compat.vit_pytorch.cct import _POSITIONS, CCT_SIZES, cct_variant
from vitlab.models.cct import CCT as _CCT

__all__ = ["CCT", "cct_2", "cct_4", "cct_6", "cct_7", "cct_8", "cct_14", "cct_16"]

# vit-pytorch's 3-D CCT passes these to its classifier itself: giving them again is an error there too
_FIXED = {"seq_pool": True, "dropout_rate": 0.0, "attention_dropout": 0.1}


class CCT(_CCT):
    """CCT ("Escaping the Big Data Paradigm with Compact Transformers", Hassani et al., 2021) on ``(B, C, T, H, W)``
    input with vit-pytorch's ``cct_3d`` arguments: ``num_frames``, ``frame_kernel_size``, ``frame_stride``,
    ``frame_padding``, ``frame_pooling_kernel_size``, ``frame_pooling_stride``, ``frame_pooling_padding`` -> the 3-D
    tokenizer's (:class:`~vitlab.models.cct.CCTTokenizer3d`); ``img_size``, ``embedding_dim``,
    ``n_input_channels``, ``n_conv_layers``, ``kernel_size``, ``stride``, ``padding``, ``pooling_*``,
    ``num_layers``, ``num_heads``, ``mlp_ratio``, ``num_classes``, ``stochastic_depth_rate``,
    ``positional_embedding`` as :class:`~vitlab.compat.vit_pytorch.cct.CCT`'s.  Sequence pooling, dropout 0 and
    attention dropout 0.1 are fixed, as in vit-pytorch (which refuses them as arguments: so does this class).

    The same parameters as vit-pytorch's; the blocks are plain pre-norm (the paper's Fig. 2; vit-pytorch, after
    the official 2-D code, normalises the stream between the halves), and the fixed sinusoid is a buffer."""

    def __init__(self, img_size: Size = 224, num_frames: int = 8, embedding_dim: int = 768,
                 n_input_channels: int = 3, n_conv_layers: int = 1, frame_stride: int = 1,
                 frame_kernel_size: int = 3, frame_padding: Optional[int] = None, frame_pooling_kernel_size: int = 1,
                 frame_pooling_stride: int = 1, frame_pooling_padding: Optional[int] = None, kernel_size: int = 7,
                 stride: int = 2, padding: int = 3, pooling_kernel_size: int = 3, pooling_stride: int = 2,
                 pooling_padding: int = 1, num_layers: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, stochastic_depth_rate: float = 0.1, positional_embedding: str = "sine",
                 **unknown: Any):
        for name, value in unknown.items():
            expected = f"no {name} (vit-pytorch's 3-D CCT fixes it at {_FIXED[name]!r})" if name in _FIXED \
                else "one of the 3-D CCT's arguments"
            raise refuse("cct_3d.CCT", name, value, expected)
        if positional_embedding not in _POSITIONS:
            raise ValueError(f"CCT: positional_embedding={positional_embedding!r}; expected one of {tuple(_POSITIONS)}")
        tokenizer = dict(stride=stride, padding=padding, pooling_kernel_size=pooling_kernel_size,
                         pooling_stride=pooling_stride, pooling_padding=pooling_padding, num_frames=num_frames,
                         frame_kernel_size=frame_kernel_size, frame_stride=frame_stride, frame_padding=frame_padding,
                         frame_pooling_kernel_size=frame_pooling_kernel_size,
                         frame_pooling_stride=frame_pooling_stride, frame_pooling_padding=frame_pooling_padding)
        super().__init__(kernel_size=kernel_size, n_conv_layers=n_conv_layers, embed="cct3d",
                         patch_size=(stride * pooling_stride) ** n_conv_layers, embed_kwargs=tokenizer,
                         img_size=img_size, in_chans=n_input_channels, embed_dim=embedding_dim, depth=num_layers,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=classes("CCT", num_classes),
                         pos_embed=_POSITIONS[positional_embedding], qkv_bias=False, norm_eps=1e-5,
                         drop_rate=_FIXED["dropout_rate"], attn_drop_rate=_FIXED["attention_dropout"],
                         drop_path_rate=stochastic_depth_rate, architecture="cct_3d")
        self.head_drop.p = 0.0  # vit-pytorch's classifier has no dropout before its head


cct_2, cct_4, cct_6, cct_7, cct_8, cct_14, cct_16 = (cct_variant(CCT, n) for n in CCT_SIZES)
