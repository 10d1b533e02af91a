"""vit-pytorch's ``vit_pytorch.ats_vit.ViT`` as a vitlab :class:`~vitlab.models.vit.VisionTransformer` with adaptive
token sampling (the ViT's ``ats=`` option, :mod:`vitlab.models.ats`)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from vitlab.compat.vit_pytorch._args import Size, set_embedding_dropout, vit_kwargs
from vitlab.layers import to_2tuple
from vitlab.models.vit import VisionTransformer

__all__ = ["ViT"]


def ats_config(max_tokens_per_depth: Sequence[int], depth: int, num_patches: int) -> Optional[Dict[str, Any]]:
    """vit-pytorch's ``max_tokens_per_depth`` (patch tokens per block, class token not counted) as vitlab's
    ``ats=dict(blocks=..., max_tokens=...)`` (class token counted): a sampler in the blocks whose bound is below the
    tokens they can receive (vit-pytorch samples only when a block has more tokens than its bound, so a bound
    not below the previous one, or not below the patch count, never samples); None when no block samples."""
    bounds = [int(k) for k in max_tokens_per_depth]
    if len(bounds) != depth:
        raise ValueError(f"ats_vit.ViT: max_tokens_per_depth={tuple(bounds)} must have one bound per block "
                         f"(depth={depth})")
    if bounds != sorted(bounds, reverse=True) or min(bounds) < 1:
        raise ValueError(f"ats_vit.ViT: max_tokens_per_depth={tuple(bounds)} must be non-increasing and >= 1")
    blocks, cap = [], num_patches
    for i, k in enumerate(bounds):
        if k < cap:
            blocks.append(i)
        cap = min(cap, k)
    return dict(blocks=tuple(blocks), max_tokens=tuple(bounds[i] + 1 for i in blocks)) if blocks else None


class ViT(VisionTransformer):
    """ViT with adaptive token sampling ("Adaptive Token Sampler for Efficient Vision Transformers", Fayyaz et al.,
    ECCV 2022) with vit-pytorch's arguments: ``max_tokens_per_depth`` (one bound on the patch tokens per block,
    non-increasing) -> ``ats=dict(blocks, max_tokens=bound + 1)`` in the blocks whose bound can bind (see
    :func:`ats_config`); the others as :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s with ``pool='cls'`` (ATS
    scores tokens by the class token's attention).  ``forward(img, return_sampled_token_ids=True)`` returns
    ``(logits, token_ids)``: ``(B, K')`` patch indices (row-major, from 0) of the tokens left after the last
    sampling, ascending, ``-1`` for padding, as vit-pytorch's.

    Follows the paper where vit-pytorch does not (sec. 3.2): inverse transform sampling of the significance CDF at
    ``K`` evenly spaced points (deterministic, the same in training and evaluation; vit-pytorch draws ``K``
    Gumbel-max samples, random also in evaluation), and a sampling block samples even when its input already has
    at most ``K`` tokens (repeats count once, so it may still drop some).  As the ViT: one linear patch embedding
    (vit-pytorch adds LayerNorms around it: ``2 * patch_dim + 2 * dim`` parameters fewer here), qkv biases
    (``3 * heads * dim_head`` more per block); ATS adds no parameters."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int,
                 max_tokens_per_depth: Sequence[int], heads: int, mlp_dim: int, channels: int = 3, dim_head: int = 64,
                 dropout: float = 0.0, emb_dropout: float = 0.0):
        kw = vit_kwargs("ats_vit.ViT", image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, "cls",
                        channels, dim_head, dropout, emb_dropout)
        (h, w), (ph, pw) = to_2tuple(image_size), to_2tuple(patch_size)
        super().__init__(**kw, ats=ats_config(max_tokens_per_depth, depth, (h // ph) * (w // pw)))
        set_embedding_dropout(self, emb_dropout)

    def forward(self, img: torch.Tensor, return_sampled_token_ids: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits, and with ``return_sampled_token_ids`` the ``(B, K')`` patch ids kept (``-1``: padding)."""
        if not return_sampled_token_ids:
            return super().forward(img)
        picks: List[Tuple[torch.Tensor, torch.Tensor]] = []  # each sampler's (idx, valid), in the order they run
        hooks = [s.register_forward_hook(lambda m, a, out: picks.append(out)) for s in getattr(self, "ats", ())]
        try:
            logits = super().forward(img)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, self._patch_ids(picks, img.shape[0], img.device)

    def _patch_ids(self, picks: List[Tuple[torch.Tensor, torch.Tensor]], batch: int, device: torch.device
                   ) -> torch.Tensor:
        """Compose the samplers' picks: each ``idx`` indexes the rows the previous sampler kept (trimmed, as
        :meth:`~vitlab.layers.token_ops.AdaptiveTokenSampler.take` trims them, to the batch's largest count)."""
        n = self.patch_embed.num_patches
        ids = torch.arange(n, device=device).expand(batch, n)
        for idx, valid in picks:
            k = valid.shape[1] if valid.is_meta else int(valid.sum(dim=-1).max())
            ids = ids.gather(1, idx[:, :k]).masked_fill(~valid[:, :k], -1)
        return ids
