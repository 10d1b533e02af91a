"""vit-pytorch's ``vit_pytorch.cvt.CvT`` as vitlab's :class:`~vitlab.models.cvt.ConvolutionalVisionTransformer`."""
from __future__ import annotations

from typing import Any, Dict

from vitlab.compat.vit_pytorch._args import classes, dropouts, refuse
from vitlab.models.cvt import ConvolutionalVisionTransformer

__all__ = ["CvT"]

_STAGES = ("s1", "s2", "s3")
_FIELDS = ("emb_dim", "emb_kernel", "emb_stride", "proj_kernel", "kv_proj_stride", "heads", "depth", "mlp_mult")


class CvT(ConvolutionalVisionTransformer):
    """CvT ("CvT: Introducing Convolutions to Vision Transformers", Wu et al., ICCV 2021) with vit-pytorch's
    arguments, per stage ``s{1,2,3}_``: ``emb_dim`` -> ``embed_dims``, ``emb_kernel`` -> ``patch_sizes`` (padding
    ``kernel // 2``, as vit-pytorch), ``emb_stride`` -> ``patch_strides``, ``proj_kernel`` -> ``kernel_qkv``,
    ``kv_proj_stride`` -> ``stride_kv``, ``heads`` -> ``num_heads``, ``depth`` -> ``depths``, ``mlp_mult`` ->
    ``mlp_ratios``; ``dropout`` -> ``drop_rate`` and ``attn_drop_rate``; ``channels`` -> ``in_chans``.

    vitlab builds the paper's model (and the official code's details) where vit-pytorch departs from it: the class
    token joins the last stage and is classified after a final LayerNorm (sec. 3; vit-pytorch: no class token,
    average pooling, no final norm); k and v each have their own depthwise conv + BatchNorm (sec. 3.2;
    vit-pytorch: one shared depthwise conv for k and v, and no bias in the pointwise projections); heads split the
    stage width (vit-pytorch: ``heads x 64`` channels whatever ``emb_dim``, e.g. 256 for its README's 4 heads at
    384); logits scaled by ``dim ** -0.5`` and QuickGELU in the MLP (official code; vit-pytorch: ``64 ** -0.5``,
    GELU); LayerNorm over the tokens (the same as vit-pytorch's channel LayerNorm of the map).  The output has
    vit-pytorch's shape ``(B, num_classes)``.
    """

    def __init__(self, *, num_classes: int, s1_emb_dim: int = 64, s1_emb_kernel: int = 7, s1_emb_stride: int = 4,
                 s1_proj_kernel: int = 3, s1_kv_proj_stride: int = 2, s1_heads: int = 1, s1_depth: int = 1,
                 s1_mlp_mult: int = 4, s2_emb_dim: int = 192, s2_emb_kernel: int = 3, s2_emb_stride: int = 2,
                 s2_proj_kernel: int = 3, s2_kv_proj_stride: int = 2, s2_heads: int = 3, s2_depth: int = 2,
                 s2_mlp_mult: int = 4, s3_emb_dim: int = 384, s3_emb_kernel: int = 3, s3_emb_stride: int = 2,
                 s3_proj_kernel: int = 3, s3_kv_proj_stride: int = 2, s3_heads: int = 6, s3_depth: int = 10,
                 s3_mlp_mult: int = 4, dropout: float = 0.0, channels: int = 3):
        args = dict(locals())
        per: Dict[str, Any] = {f: tuple(args[f"{s}_{f}"] for s in _STAGES) for f in _FIELDS}
        for s in _STAGES:
            heads, dim = args[f"{s}_heads"], args[f"{s}_emb_dim"]
            if heads < 1 or dim % heads:
                raise refuse("CvT", f"{s}_heads", heads, f"a divisor of {s}_emb_dim={dim} (vitlab splits the stage "
                             "width into the heads)")
        drops = dropouts("CvT", dropout, 0.0)
        super().__init__(img_size=224, in_chans=channels, num_classes=classes("CvT", num_classes),
                         embed_dims=per["emb_dim"], depths=per["depth"], num_heads=per["heads"],
                         mlp_ratios=per["mlp_mult"], patch_sizes=per["emb_kernel"], patch_strides=per["emb_stride"],
                         patch_paddings=tuple(k // 2 for k in per["emb_kernel"]), kernel_qkv=per["proj_kernel"],
                         stride_kv=per["kv_proj_stride"], drop_rate=drops["drop_rate"],
                         attn_drop_rate=drops["attn_drop_rate"])
