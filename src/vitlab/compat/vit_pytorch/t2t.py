"""vit-pytorch's ``vit_pytorch.t2t.T2TViT`` as vitlab's :class:`~vitlab.models.t2t.T2TViT`."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

from vitlab.compat.vit_pytorch._args import dropouts, head_dim, mlp_ratio, pool_kwargs, classes, refuse, \
    set_embedding_dropout
from vitlab.models.t2t import T2TViT as _T2TViT

__all__ = ["T2TViT"]


class T2TViT(_T2TViT):
    """T2T-ViT ("Tokens-to-Token ViT", Yuan et al., ICCV 2021) with vit-pytorch's arguments: ``t2t_layers``
    ``((kernel, stride), ...)`` -> the soft splits ``(kernel, stride, stride // 2)`` (``patch_size`` their strides'
    product), ``dim``, ``depth``, ``heads``, ``mlp_dim``, ``dim_head``, ``pool``, ``channels``, ``dropout``,
    ``emb_dropout`` as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s.  ``transformer`` (a module of one's own)
    cannot be honoured.

    Follows the paper where vit-pytorch does not: the token layers reduce the soft splits to ``token_dim = 64``
    channels (sec. 3.1; one-head transformer layers with ``v`` as the skip, the official ``T2T-ViT_t``; vit-pytorch
    keeps the growing width ``C*k*k`` and has no reduction), the position table is the fixed 1-D sinusoid
    (vit-pytorch: learned), no qkv bias and LayerNorm eps 1e-5 (the official code's).  The backbone's parameters
    equal vit-pytorch's; the stem and the table differ.  ``dropout`` acts in the backbone only (vit-pytorch also
    drops in the token layers)."""

    def __init__(self, *, image_size: int, num_classes: int, dim: int, depth: Optional[int] = None,
                 heads: Optional[int] = None, mlp_dim: Optional[int] = None, pool: str = "cls", channels: int = 3,
                 dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0, transformer: Any = None,
                 t2t_layers: Sequence[Tuple[int, int]] = ((7, 4), (3, 2), (3, 2))):
        if transformer is not None:
            raise refuse("T2TViT", "transformer", type(transformer).__name__, "None and depth, heads, mlp_dim")
        if depth is None or heads is None or mlp_dim is None:
            raise ValueError(f"T2TViT: depth, heads and mlp_dim are needed, got {depth}, {heads}, {mlp_dim}")
        splits = [(int(k), int(s), int(s) // 2) for k, s in t2t_layers]
        super().__init__(token_mixer="transformer", token_dim=64, embed_kwargs=dict(splits=splits),
                         img_size=image_size, patch_size=math.prod(s for _, s, _ in splits),
                         num_classes=classes("T2TViT", num_classes), embed_dim=dim, depth=depth, num_heads=heads,
                         mlp_ratio=mlp_ratio("T2TViT", mlp_dim, dim), in_chans=channels,
                         mixer_kwargs=head_dim("T2TViT", dim, heads, dim_head), qkv_bias=False, norm_eps=1e-5,
                         fc_norm=False,  # vit-pytorch normalises the tokens, then pools
                         **pool_kwargs("T2TViT", pool, True), **dropouts("T2TViT", dropout, emb_dropout))
        set_embedding_dropout(self, emb_dropout)
