"""Parts that change the number of tokens: patch dropout, the PatchMerger, adaptive token sampling.

After any of them the tokens are no longer a full grid in raster order, so they travel with a
:class:`TokenSubset` layout: a 1-D "grid" of the tokens left, whose :meth:`TokenSubset.to_map` and
:attr:`TokenSubset.hw` refuse with one clear error, so parts that need the 2-D map (windows,
convolutions, pooling) stop instead of silently reshaping the wrong tokens.

* :class:`PatchDropout` is timm's (re-exported): "PatchDropout: Economizing Vision Transformers Using
  Patch Dropout", Liu et al., WACV 2023.
* :class:`PatchMerger`: "Learning to Merge Tokens in Vision Transformers", Renggli et al., 2022, sec. 3.
* :func:`ats_significance`, :func:`inverse_transform_sample`: "Adaptive Token Sampler for Efficient Vision
  Transformers", Fayyaz et al., ECCV 2022, sec. 3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from timm.layers import PatchDropout  # noqa: F401  (Liu et al., WACV 2023; timm's is well kept)
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.norm import create_norm

__all__ = ["TokenSubset", "PatchDropout", "PatchMerger", "ats_significance", "inverse_transform_sample",
           "ats_points", "AdaptiveTokenSampler", "patch_drop_active"]


@dataclass(frozen=True)
class TokenSubset(TokenLayout):
    """The layout of tokens that no longer form the grid: ``num_prefix`` prefix tokens, then
    ``grid[0]`` tokens in no spatial order (kept by patch dropout, merged by a PatchMerger, sampled
    by ATS).  ``source`` names what made them, ``full_grid`` the grid they came from."""

    source: str = field(default="a token-count part", compare=False)  # layouts compare by shape
    full_grid: Tuple[int, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, num_tokens: int, num_prefix: int, source: str, full_grid: Tuple[int, ...] = ()) -> "TokenSubset":
        return cls(grid=(num_tokens - num_prefix,), num_prefix=num_prefix, source=source, full_grid=tuple(full_grid))

    def _refuse(self, what: str):
        raise ValueError(f"{what} needs the 2-D token map, but the {self.num_grid} tokens left by {self.source}"
                         f"{f' from the {self.full_grid} grid' if self.full_grid else ''} form no map; use parts "
                         "that need no map (global attention, MLP), output_fmt='NLC', or eval mode for patch dropout")

    @property
    def hw(self) -> Tuple[int, int]:
        self._refuse("this part")

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse("a (B, C, H, W) view")

    def from_map(self, fm: torch.Tensor, prefix: torch.Tensor = None) -> torch.Tensor:
        self._refuse("a (B, C, H, W) view")


def patch_drop_active(drop: Optional[nn.Module]) -> bool:
    """Whether ``drop`` (a model's ``patch_drop``) drops tokens now: timm's PatchDropout in training."""
    return isinstance(drop, PatchDropout) and drop.training and drop.prob > 0


class PatchMerger(nn.Module):
    """``M`` learned queries merge the grid tokens into ``M`` tokens: ``Y = softmax(W LN(X)^T) LN(X)``,
    ``W (M, D)``, the softmax over the ``N`` input tokens (Renggli et al., 2022, sec. 3: placed once,
    halfway through the encoder, ``M = 8``).  Prefix (class) tokens pass through unchanged, so a
    class-token head still reads its token.  As a downsampler: ``(tokens, layout) -> (tokens, layout)``.
    No ``1/sqrt(D)`` factor on the scores (vit-pytorch's adds one; a rescaled ``W`` is the same model)."""

    def __init__(self, dim: int, num_tokens: int = 8, norm: str = "layernorm", norm_eps: float = 1e-6):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"PatchMerger num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.norm = create_norm(norm, dim, eps=norm_eps)
        self.queries = nn.Parameter(torch.empty(num_tokens, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)

    def weights(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The merge weights ``(B, M, N)`` over the ``N`` grid tokens (rows sum to 1)."""
        return (self.norm(x[:, layout.num_prefix:]) @ self.queries.t()).transpose(1, 2).softmax(dim=-1)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        p = layout.num_prefix
        t = self.norm(x[:, p:])
        y = (t @ self.queries.t()).transpose(1, 2).softmax(dim=-1) @ t  # (B, M, N) @ (B, N, D)
        out = torch.cat([x[:, :p], y], dim=1) if p else y
        return out, TokenSubset.of(out.shape[1], p, "a PatchMerger", getattr(layout, "full_grid", ()) or layout.grid)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"


# -- Adaptive Token Sampling ------------------------------------------------------------------------
def ats_significance(attn: torch.Tensor, v: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """ATS significance scores (Fayyaz et al., ECCV 2022, sec. 3.2, eq. 4): the class token's attention
    to each non-prefix token ``j``, weighted by ``||v_j||`` and summed over heads, normalised to sum 1.
    ``attn (B, H, N, N)`` probabilities (row 0: the class token), ``v (B, H, N, d)`` -> ``(B, N - P)``."""
    s = (attn[:, :, 0, num_prefix:] * v[:, :, num_prefix:].norm(dim=-1)).sum(dim=1)
    return s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def inverse_transform_sample(scores: torch.Tensor, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse transform sampling of token indices from ``scores (B, N)`` (a distribution per row) at
    the points ``u (B, K)`` in ``[0, 1)``: index ``j`` is drawn where ``CDF[j-1] <= u < CDF[j]`` (sec. 3.2,
    eq. 5-6).  Duplicates are dropped (at most ``K`` unique tokens): returns ``idx (B, K)`` ascending per
    row and ``valid (B, K)``; the ``K'`` unique indices of a row come first, the rest repeat the last
    valid index and are marked invalid."""
    n = scores.shape[-1]
    cdf = scores.cumsum(dim=-1)
    idx = torch.searchsorted(cdf.contiguous(), u.to(cdf.dtype).contiguous(), right=True)
    # a point past a rounded-down total takes the last token with any score, never a zero-score one (padding)
    last = torch.where(scores > 0, torch.arange(n, device=scores.device), 0).amax(dim=-1, keepdim=True)
    idx = torch.minimum(idx, last)
    idx, _ = idx.sort(dim=-1)
    valid = torch.ones_like(idx, dtype=torch.bool)
    valid[:, 1:] = idx[:, 1:] != idx[:, :-1]  # sorted: a repeat equals its left neighbour
    # unique indices first (a stable sort of ~valid keeps their ascending order), repeats after
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
    idx, valid = idx.gather(1, order), valid.gather(1, order)
    last = idx.gather(1, (valid.sum(dim=-1, keepdim=True) - 1))
    return torch.where(valid, idx, last), valid


def ats_points(batch: int, k: int, device=None, generator: Optional[torch.Generator] = None,
               random: bool = False) -> torch.Tensor:
    """The ``K`` points inverse transform sampling reads, ``(B, K)`` in ``[0, 1)``: evenly spaced
    ``(2i + 1) / 2K`` (deterministic) or, ``random``, uniform noise."""
    if random:
        return torch.rand(batch, k, device=device, generator=generator)
    return ((torch.arange(k, device=device, dtype=torch.float32) * 2 + 1) / (2 * k)).expand(batch, k)


def _class_row_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The class token's row of a layout's attention ``mask`` (``(B, N)`` or ``(B, N, N)``, boolean or additive)
    as an additive ``(B, 1, 1, N)`` logit bias (0: attend, -inf: not)."""
    m = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :1]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
    return m.to(dtype)


class AdaptiveTokenSampler(nn.Module):
    """ATS in one attention layer (Fayyaz et al., ECCV 2022, sec. 3): the significance of every token from
    the class token's row of ``attn``'s own softmax attention over the normed tokens ``xn`` (only that
    row is formed: one query), then at most ``num_tokens`` unique tokens by inverse transform sampling.
    Returns ``(idx, valid)`` as :func:`inverse_transform_sample`, indices over the non-prefix tokens.
    In a model (the ViT's ``ats=`` argument, :mod:`vitlab.models.ats`) :meth:`run_block` runs a whole block
    with the sampling inside it: the rows ``idx`` of the attention's output are the tokens ATS keeps."""

    def __init__(self, num_tokens: int):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"ATS num_tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens

    def scores(self, attn: nn.Module, xn: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``(B, N - P)`` significance scores (:func:`ats_significance`) through ``attn``'s parts."""
        if layout.num_prefix < 1:
            raise ValueError("adaptive token sampling needs a class token (num_prefix >= 1), got none")
        q, k, v = attn.core.prepare(attn, *attn.projection(attn, xn[:, :1], xn))
        logits = attn.core.logits(attn, q, k)  # (B, H, 1, N)
        if layout.mask is not None:  # padding left by an earlier sampling step gets no attention: never sampled
            logits = logits + _class_row_bias(layout.mask, logits.dtype)
        return ats_significance(attn.core.normalize(attn, logits), v, layout.num_prefix)

    def forward(self, attn: nn.Module, xn: torch.Tensor, layout: TokenLayout,
                u: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        u = ats_points(xn.shape[0], self.num_tokens, xn.device) if u is None else u
        return inverse_transform_sample(self.scores(attn, xn, layout), u)

    def take(self, x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, layout: TokenLayout
             ) -> Tuple[torch.Tensor, TokenLayout]:
        """The prefix tokens, then the grid rows ``idx`` of ``x``: ``(B, P + K, C)`` with ``K`` the most tokens an
        image of the batch keeps; a row's other slots are padding (zeros), which the returned
        :class:`TokenSubset` layout's key-padding ``mask (B, P + K)`` keeps out of every later attention
        (no mask when no image pads).  On the ``meta`` device (shapes only) ``K`` is its bound, every point."""
        p, meta = layout.num_prefix, valid.device.type == "meta"
        k = valid.shape[1] if meta else int(valid.sum(dim=-1).max())  # one sync: the batch's token count
        idx, valid = idx[:, :k], valid[:, :k]
        rows = x[:, p:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1])).masked_fill(~valid[..., None], 0)
        keep = torch.cat([valid.new_ones(valid.shape[0], p), valid], dim=1)
        sub = TokenSubset.of(p + k, p, "adaptive token sampling", getattr(layout, "full_grid", ()) or layout.grid)
        return torch.cat([x[:, :p], rows], dim=1), sub.with_mask(keep if meta or not bool(valid.all()) else None)

    def run_block(self, blk: nn.Module, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        """Block ``blk`` with ATS inside it (sec. 3, fig. 2): significance scores from the block's own attention
        over its (normed) input, its attention half on every token, then only the kept tokens (prefix first)
        through its MLP half: ``(B, N, C) -> (B, P + K, C)`` and their layout; padding rows leave as zeros."""
        if hasattr(blk, "attns") or blk.wiring not in ("pre", "post"):
            raise ValueError(f"adaptive token sampling needs a block with wiring 'pre' or 'post' and one attention "
                             f"branch; got wiring {blk.wiring!r} with {blk.num_parallel} branch(es)")
        idx, valid = self(blk.attn, x if blk.post_norm else blk.norm1(x), layout)
        x, layout = self.take(blk.attn_half(x, layout), idx, valid, layout)
        x = blk.mlp_half(x, layout)
        return (x if layout.mask is None else x.masked_fill(~layout.mask[..., None], 0)), layout

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"
