"""vit-pytorch's ``vit_pytorch.xcit.XCiT`` as vitlab's :class:`~vitlab.models.xcit.Xcit`."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import classes, dropouts, head_dim, mlp_ratio, refuse
from vitlab.models.xcit import Xcit

__all__ = ["XCiT"]


class XCiT(Xcit):
    """XCiT ("XCiT: Cross-Covariance Image Transformers", El-Nouby et al., NeurIPS 2021) with vit-pytorch's
    arguments: ``dim`` -> ``embed_dim``, ``depth`` (XCA blocks), ``cls_depth`` -> ``cls_attn_layers``, ``heads`` ->
    ``num_heads``, ``mlp_dim`` -> ``mlp_ratio``, ``dim_head`` must be ``dim / heads``, ``dropout`` ->
    ``attn_drop_rate`` and ``proj_drop_rate``, ``emb_dropout`` -> ``pos_drop_rate``, ``layer_dropout`` ->
    ``drop_path_rate``, ``local_patch_kernel_size`` must be 3 (the paper's).  LayerScale ``eta`` 1.0 up to 12
    blocks, 1e-5 beyond, and ``tokens_norm=True`` (the paper's models, sec. 4 / official code).

    Follows the paper where vit-pytorch does not: the patch stem is ``log2(patch_size)`` 3x3 stride-2 convs with
    BatchNorm and GELU (sec. 3.3; vit-pytorch: LayerNorm, Linear, LayerNorm), the position code is the Fourier
    features of any grid (vit-pytorch: a learned table, so vitlab takes any input size divisible by the patch);
    qkv biases (``3 * dim`` parameters more per block); one final LayerNorm after class attention (vit-pytorch also
    normalises the XCA output before it: ``2 * dim`` fewer here); stochastic depth per sample in training
    (vit-pytorch's ``layer_dropout`` drops whole layers, in evaluation too).
    """

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, cls_depth: int,
                 heads: int, mlp_dim: int, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
                 local_patch_kernel_size: int = 3, layer_dropout: float = 0.0):
        head_dim("XCiT", dim, heads, dim_head, per_head=False)
        if local_patch_kernel_size != 3:
            raise refuse("XCiT", "local_patch_kernel_size", local_patch_kernel_size, "3 (the paper's LPI)")
        drops = dropouts("XCiT", dropout, emb_dropout)
        super().__init__(img_size=image_size, patch_size=patch_size, num_classes=classes("XCiT", num_classes),
                         embed_dim=dim, depth=depth, cls_attn_layers=cls_depth, num_heads=heads,
                         mlp_ratio=mlp_ratio("XCiT", mlp_dim, dim), attn_drop_rate=drops["attn_drop_rate"],
                         proj_drop_rate=drops["drop_rate"], pos_drop_rate=emb_dropout, drop_path_rate=layer_dropout,
                         eta=1.0 if depth <= 12 else 1e-5, tokens_norm=True)
