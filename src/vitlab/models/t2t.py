"""T2T-ViT as recipes over vitlab's :class:`VisionTransformer`.

"Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet" (Yuan, Chen, Wang, Yu, Shi, Jiang,
Tay, Feng, Yan; ICCV 2021).  The tokens-to-token stem (sec. 3.1; :class:`vitlab.layers.tokenizers.T2TEmbed`,
``embed="t2t"``: soft splits 7/4, 3/2, 3/2 with a token layer of width ``token_dim`` = 64 between them), a class
token, the fixed 1-D sinusoid position table (``pos_embed="sincos_1d"``, class row included) and a deep-narrow
isotropic ViT backbone (sec. 3.2, Table 1) with the official code's choices: no qkv bias, LayerNorm eps 1e-5.

* ``t2t_vit_{7,10,12,14,19,24}``: Performer token layers (official ``token_performer.py``), the official default.
* ``t2t_vit_t_{14,19,24}``: plain one-head transformer token layers (official ``token_transformer.py``).

Parameter counts: ``model.parameters()`` equals the official code's trainable parameters exactly; the paper's
Tables 3-4 (4.3M, 5.9M, 6.9M, 21.5M, 39.2M, 64.1M) also count the official code's frozen Parameters (the
sinusoid table and the Performer's random features ``w``), which vitlab keeps as buffers: with them every size
is within 0.7% of the paper, without them T2T-ViT-7/10 are 1.0%/1.1% below it (4.26M, 5.83M: the figures of
the official README's first version, 4.2M and 5.8M).  The official code sets ``qk_scale = embed_dim ** -0.5``
only when it loads its pretrained weights; vitlab keeps ``head_dim ** -0.5``, the training setting.

vit-pytorch's ``T2TViT`` deviates from the paper and the official code: its token layers are plain transformers
with the usual residual at the growing split width ``C*k*k`` (147, then 1323: no reduction to ``token_dim``,
no ``v`` skip), and its position table is learned; this recipe follows the paper and the official code.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__ = ["T2TViT"]


class T2TViT(VisionTransformer):
    """A :class:`VisionTransformer` whose stem defaults to T2T (Yuan et al., ICCV 2021, sec. 3).

    ``token_mixer`` (``performer`` | ``transformer``) and ``token_dim`` configure the T2T stem (merged into
    ``embed_kwargs``); every other argument is the ViT's."""

    def __init__(self, token_mixer: str = "performer", token_dim: int = 64, embed: str = "t2t",
                 pos_embed: str = "sincos_1d", embed_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any):
        stem = dict(token_mixer=token_mixer, token_dim=token_dim) if embed == "t2t" else {}
        super().__init__(embed=embed, pos_embed=pos_embed, embed_kwargs={**stem, **(embed_kwargs or {})}, **kwargs)

    def _init_weights(self, init: str) -> None:
        super()._init_weights(init)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)  # the official T2T-ViT init (vitlab's ViT: 1e-6)


# (embed_dim, depth, num_heads, mlp_ratio): the paper's Table 1 / the official t2t_vit.py
_SIZES = {
    "7": (256, 7, 4, 2.0),
    "10": (256, 10, 4, 2.0),
    "12": (256, 12, 4, 2.0),
    "14": (384, 14, 6, 3.0),
    "19": (448, 19, 7, 3.0),
    "24": (512, 24, 8, 3.0),
}


def _register(name: str, size: str, token_mixer: str) -> None:
    dim, depth, heads, mlp = _SIZES[size]
    defaults = dict(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp,
                    token_mixer=token_mixer, token_dim=64, qkv_bias=False, norm_eps=1e-5)
    register_recipe(T2TViT, name, defaults, f"{name}: T2T-ViT{'_t' if token_mixer == 'transformer' else ''}-{size}"
                    f" (Yuan et al., ICCV 2021), {token_mixer} token layers ({defaults}).", crop_pct=0.9)


for _size in _SIZES:
    _register(f"t2t_vit_{_size}", _size, "performer")
for _size in ("14", "19", "24"):
    _register(f"t2t_vit_t_{_size}", _size, "transformer")
