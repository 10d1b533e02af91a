"""CCT (Compact Convolutional Transformers) as recipes over vitlab's :class:`VisionTransformer`.

"Escaping the Big Data Paradigm with Compact Transformers" (Hassani, Walton, Shah, Abuduweili, Li, Shi; 2021).
Three changes to a small ViT: the convolutional tokenizer (sec. 3.3; :class:`vitlab.layers.tokenizers.CCTTokenizer`,
``embed="cct"``: ``n`` blocks of ``k x k`` conv without bias, ReLU, 3x3 max-pool stride 2), **no class token**
and **sequence pooling** (sec. 3.2; ``global_pool="seqpool"``: ``softmax(g(x_L))^T x_L`` with ``g`` the
``attention_pool`` Linear(dim, 1), after the final norm).  Position table learned (trunc-normal std 0.2, as
official) or, with ``pos_embed="sincos_1d"``, the paper's sinusoid (the official ``*_sine`` variants).

Names as the paper and the official code (``cct_{layers}_{kernel}x{conv layers}_{resolution}``); sizes from the
official ``src/cct.py``: CCT-2/4 dim 128, 2 heads, MLP ratio 1; CCT-6/7 dim 256, 4 heads, ratio 2; CCT-14 dim
384, 6 heads, ratio 3; no qkv bias; LayerNorm eps 1e-5; dropout 0, attention dropout 0.1, stochastic depth 0.1
(linear over the blocks).  The CIFAR models (32 px) have 10 classes, ``cct_7_7x2_224`` 102 (Flowers-102).

Parameter counts equal the official code's exactly (``tests/test_t2t_cct.py``).  The official README's 3.168M
(CCT-6/3x1) and 22.29M (CCT-14/7x2) are the counts with the frozen sinusoid table (``pos_embed="sincos_1d"``);
with the default learned table they are 3.234M and 22.37M.

**Deviation** (from the official code and vit-pytorch, which copies it): the official
``TransformerEncoderLayer`` is not a plain pre-norm block: it normalises the stream itself between the halves,
``x = norm1(x + attn(pre_norm(x))); x = x + mlp(x)``.  vitlab's blocks here are plain pre-norm,
``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (the paper's Fig. 2 / a standard ViT encoder), with the same
parameters (two LayerNorms per block), so official weights load with renamed keys but compute differently.

**Volumes and video** (``embed="cct3d"``, :class:`CCTTokenizer3d`): the tokenizer with 3-D convolutions, as
vit-pytorch's ``cct_3d``; the input is ``(B, C, T, H, W)`` and the tokens lie on a ``(T', H', W')`` grid.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD
from vitlab.layers.tokenizers import CCTTokenizer3d
from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__ = ["CCT", "CCTTokenizer3d"]


class CCT(VisionTransformer):
    """A :class:`VisionTransformer` with CCT's tokenizer, no class token and sequence pooling by default
    (Hassani et al., 2021, sec. 3).

    ``kernel_size`` and ``n_conv_layers`` configure the tokenizer (merged into ``embed_kwargs``); ``patch_size``
    defaults to its total stride ``(conv stride * 2) ** n_conv_layers``; every other argument is the ViT's."""

    def __init__(self, kernel_size: int = 3, n_conv_layers: int = 1, patch_size: Optional[int] = None,
                 embed: str = "cct", embed_kwargs: Optional[Dict[str, Any]] = None, class_token: bool = False,
                 global_pool: str = "seqpool", **kwargs: Any):
        if kernel_size < 1 or n_conv_layers < 1:
            raise ValueError(f"kernel_size and n_conv_layers must be positive, got {kernel_size}, {n_conv_layers}")
        if patch_size is None:
            patch_size = (max(1, kernel_size // 2 - 1) * 2) ** n_conv_layers  # conv stride x max-pool stride 2
        stem = dict(kernel_size=kernel_size, n_conv_layers=n_conv_layers) if embed in ("cct", "cct3d") else {}
        if embed == "cct3d" and kwargs.get("pos_embed") in ("sincos", "sincos_big_vision"):  # 2-D codes
            raise ValueError(f"pos_embed={kwargs['pos_embed']!r} is a 2-D code; the 3-D tokenizer takes 'learned', "
                             "'sincos_1d' or 'none'")
        super().__init__(patch_size=patch_size, embed=embed, embed_kwargs={**stem, **(embed_kwargs or {})},
                         class_token=class_token, global_pool=global_pool, **kwargs)
        if embed == "cct3d":  # a video input_size (C, T, H, W), as the video family's configs
            self.default_cfg = dict(self.default_cfg, input_size=(self.in_chans, self.patch_embed.num_frames,
                                                                  *self.patch_embed.img_size))

    def check_input(self, x: torch.Tensor) -> None:
        if isinstance(self.patch_embed, CCTTokenizer3d):  # (B, C, T, H, W): the 3-D tokenizer checks it
            self.patch_embed.check(x)
        else:
            super().check_input(x)

    def _init_weights(self, init: str) -> None:
        super()._init_weights(init)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.2)  # the official init (vitlab's ViT: 0.02)


# (embed_dim, depth, num_heads, mlp_ratio): the official cct_2 ... cct_14
_SIZES = {
    2: (128, 2, 2, 1.0),
    4: (128, 4, 2, 1.0),
    6: (256, 6, 4, 2.0),
    7: (256, 7, 4, 2.0),
    14: (384, 14, 6, 3.0),
}
_CIFAR = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)


def _register(size: int, kernel: int, layers: int, img: int, num_classes: int, **cfg: Any) -> None:
    name = f"cct_{size}_{kernel}x{layers}_{img}"
    dim, depth, heads, mlp = _SIZES[size]
    defaults = dict(img_size=img, num_classes=num_classes, kernel_size=kernel, n_conv_layers=layers, embed_dim=dim,
                    depth=depth, num_heads=heads, mlp_ratio=mlp, qkv_bias=False, norm_eps=1e-5, drop_rate=0.0,
                    attn_drop_rate=0.1, drop_path_rate=0.1)
    register_recipe(CCT, name, defaults, f"{name}: CCT-{size}/{kernel}x{layers} at {img}x{img} (Hassani et al., "
                    f"2021) ({defaults}).", **cfg)


for _size, _layers in ((2, 2), (4, 2), (6, 1), (6, 2), (7, 1), (7, 2)):
    _register(_size, 3, _layers, 32, 10, **_CIFAR)
_register(7, 7, 2, 224, 102)  # Flowers-102
_register(14, 7, 2, 224, 1000)
_register(14, 7, 2, 384, 1000, crop_pct=1.0)
