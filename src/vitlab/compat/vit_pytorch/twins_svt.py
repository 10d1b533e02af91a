"""vit-pytorch's ``vit_pytorch.twins_svt.TwinsSVT`` as vitlab's :class:`~vitlab.models.twins.Twins` (SVT)."""
from __future__ import annotations

from vitlab.compat.vit_pytorch._args import classes, dropouts, refuse
from vitlab.models.twins import Twins

__all__ = ["TwinsSVT"]

_HEAD_DIM = 32  # the paper's SVT head dimension (Chu et al., 2021, Table 2: 64 / 2, 128 / 4, ...)


class TwinsSVT(Twins):
    """Twins-SVT ("Twins: Revisiting the Design of Spatial Attention in Vision Transformers", Chu et al., NeurIPS
    2021, sec. 2.2) with vit-pytorch's arguments, per stage ``s{i}_``: ``emb_dim`` -> ``embed_dims``,
    ``patch_size`` (``s1_``: the stem's patch; later stages must be 2, the paper's), ``local_patch_size`` -> ``wss``
    (LSA windows), ``global_k`` -> ``sr_ratios`` (GSA reduction), ``depth``: vit-pytorch runs ``1 + depth`` pairs
    of LSA and GSA blocks (stage 4: ``1 + depth`` GSA blocks, no LSA), so ``depths`` are ``2 * (1 + depth)`` and
    ``1 + depth`` with stage 4's window 1 (all GSA); ``peg_kernel_size`` must be 3 (the paper's PEG); ``dropout``
    -> ``attn_drop_rate`` and ``proj_drop_rate``.

    Follows the paper where vit-pytorch does not: ``emb_dim / 32`` heads of 32 channels (vit-pytorch: 8 heads of
    64 in every stage, a 512-wide attention even at width 64), GSA keys/values from a ``k x k`` conv to the stage
    width (vit-pytorch: to twice the 512-wide inner width, ``49 * 1024 * dim`` weights per GSA), qkv biases, LayerNorm
    patch embeddings as convs of stride ``patch``, the PEG after the first block of each stage (vit-pytorch: after
    the first LSA/GSA pair) and a final LayerNorm (vit-pytorch: none).  README configuration: vit-pytorch 252.0 M
    parameters against the paper's Twins-SVT-S 24.0 M; vitlab builds 113.0 M, as ``global_k`` is honoured (the
    README's 7 in every stage: a 7x7 conv of the stage width, 12.8 M per GSA of stage 4), 30.1 M with the paper's
    reductions ``s1..s4_global_k = 8, 4, 2, 1`` (the README's deeper stages: 4, 4, 12, 5 blocks).
    """

    def __init__(self, *, num_classes: int, s1_emb_dim: int = 64, s1_patch_size: int = 4,
                 s1_local_patch_size: int = 7, s1_global_k: int = 7, s1_depth: int = 1, s2_emb_dim: int = 128,
                 s2_patch_size: int = 2, s2_local_patch_size: int = 7, s2_global_k: int = 7, s2_depth: int = 1,
                 s3_emb_dim: int = 256, s3_patch_size: int = 2, s3_local_patch_size: int = 7, s3_global_k: int = 7,
                 s3_depth: int = 5, s4_emb_dim: int = 512, s4_patch_size: int = 2, s4_local_patch_size: int = 7,
                 s4_global_k: int = 7, s4_depth: int = 4, peg_kernel_size: int = 3, dropout: float = 0.0,
                 image_size: int = 224):
        for i, p in ((2, s2_patch_size), (3, s3_patch_size), (4, s4_patch_size)):
            if p != 2:
                raise refuse("TwinsSVT", f"s{i}_patch_size", p, "2 (the paper's stride-2 patch merging)")
        if peg_kernel_size != 3:
            raise refuse("TwinsSVT", "peg_kernel_size", peg_kernel_size, "3 (the paper's PEG)")
        dims = (s1_emb_dim, s2_emb_dim, s3_emb_dim, s4_emb_dim)
        if any(d % _HEAD_DIM for d in dims):
            raise refuse("TwinsSVT", "s*_emb_dim", dims, f"multiples of {_HEAD_DIM} (the paper's head dimension)")
        drops = dropouts("TwinsSVT", dropout, 0.0)
        super().__init__(img_size=image_size, patch_size=s1_patch_size, num_classes=classes("TwinsSVT", num_classes),
                         embed_dims=dims, num_heads=tuple(d // _HEAD_DIM for d in dims), mlp_ratios=(4, 4, 4, 4),
                         depths=(2 * (1 + s1_depth), 2 * (1 + s2_depth), 2 * (1 + s3_depth), 1 + s4_depth),
                         sr_ratios=(s1_global_k, s2_global_k, s3_global_k, s4_global_k),
                         wss=(s1_local_patch_size, s2_local_patch_size, s3_local_patch_size, 1),
                         proj_drop_rate=drops["drop_rate"], attn_drop_rate=drops["attn_drop_rate"])
