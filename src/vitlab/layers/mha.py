"""Multi-head attention composed of parts: projection + grouping + core + modifiers + position.

This module holds the package's only fused-vs-explicit branch: the core's fused kernel (SDPA for
the softmax family, the O(N) product for linear attention) unless attention is being recorded or a
modifier needs the matrix, in which case the probabilities are formed explicitly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from vitlab.layers.attn_parts import (CORES, GROUPINGS, MODIFIERS, POSITION_BIASES, PROJECTIONS, PartSpec,
                                      build_part, check_compatible, part_keys)
from vitlab.layers.grouping import Branch
from vitlab.layers.layout import TokenLayout
from vitlab.layers.linear import Linear
from vitlab.layers.recording import RecordsAttention
from vitlab.registry import check_kwargs

__all__ = ["MultiHeadAttention"]


def _as_specs(specs) -> tuple:
    if specs is None:
        return ()
    if isinstance(specs, str) or (isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[1], dict)):
        return (specs,)
    return tuple(specs)


# Up to this many logits per head, a CPU attention with an additive bias (relative tables, LeViT's offsets, windows)
# runs faster written out than through SDPA, whose CPU path with a float mask adds a masked-row check (all / where
# / isneginf); measured 1.6-1.9x on 49x49 and 49x196 maps, equal at 196x196 on its own and faster inside LeViT
# (this project's 2-core CPU).
EXPLICIT_BIAS_LOGITS = 196 * 196


def _explicit_is_faster(br: Branch, bias: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> bool:
    """Small biased attention on a CPU, without a layout mask (whose fully masked rows only SDPA handles)."""
    return (bias is not None and keep is None and br.q.device.type == "cpu"
            and br.q.shape[-2] * br.k.shape[-2] <= EXPLICIT_BIAS_LOGITS)


class MultiHeadAttention(RecordsAttention, nn.Module):
    """Attention built from named parts (:mod:`vitlab.layers.attn_parts`); the output projection is
    ``proj`` (timm's name).  ``layout`` (a :class:`TokenLayout`) is the token layout the module is built
    for: parts that size tables by it (windows, relative tables, FLatten's key position code) need it.

    ``part_kwargs`` are loose keyword arguments (``tau=``, ``window_size=``, ``qk_norm=``, ...), each
    handed to every chosen part whose constructor takes it; a key no part takes raises ``ValueError``.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, projection: PartSpec = "linear",
                 grouping: PartSpec = "global", core: PartSpec = "softmax", modifiers: Sequence[PartSpec] = (),
                 position: Sequence[PartSpec] = (), head_dim: Optional[int] = None, out_dim: Optional[int] = None,
                 value_dim: Optional[int] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 proj_bias: bool = True,
                 layout: Optional[TokenLayout] = None, num_tokens: Optional[int] = None,
                 qk_scale: Optional[float] = None, **part_kwargs: Any):
        super().__init__()
        if qk_scale is not None and not qk_scale > 0:
            raise ValueError(f"qk_scale must be a positive float or None, got {qk_scale!r}")
        self.qk_scale = qk_scale  # replaces head_dim ** -0.5 for the softmax family (timm's former qk_scale)
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = head_dim or dim // num_heads
        self.inner, self.out_dim = self.num_heads * self.head_dim, out_dim or dim
        self.value_dim = value_dim or self.head_dim  # per-head width of V (LeViT: attn_ratio x the key width)
        self.value_inner = self.num_heads * self.value_dim
        self.layout, self.num_tokens = layout, num_tokens if layout is None else layout.num_tokens
        modifiers, position = _as_specs(modifiers), _as_specs(position)
        valid = part_keys(projection, grouping, core, modifiers, position)
        check_kwargs("attention parts " + ", ".join(str(s if isinstance(s, str) else getattr(s, "name", s[0]))
                                                    for s in (projection, grouping, core, *modifiers, *position)),
                     part_kwargs, valid)
        self.grouping = build_part(GROUPINGS, grouping, part_kwargs)
        self.projection = build_part(PROJECTIONS, projection, part_kwargs)
        self.core = build_part(CORES, core, part_kwargs)
        self.modifiers = [build_part(MODIFIERS, m, part_kwargs) for m in modifiers]
        self.positions = [build_part(POSITION_BIASES, p, part_kwargs) for p in position]
        self.grouping.setup(self)
        check_compatible(self.core, self.grouping, self.modifiers, self.positions,
                         layout.num_prefix if layout is not None else 0)
        self._check_value_width()
        for part in (self.projection, self.core, *self.modifiers, *self.positions):
            part.setup(self)
        self.attn_drop = nn.Dropout(attn_drop)
        out = getattr(self.projection, "output", None)  # a projection may own the output projection (LeViT's)
        self.proj = (out(self, proj_bias) if out is not None
                     else Linear(self.value_inner, self.out_dim, bias=proj_bias))
        self.proj_drop = nn.Dropout(proj_drop)
        self._needs_matrix = any(m.needs_matrix for m in self.modifiers)
        self.plain_global = (self.grouping.name == "global" and self.projection.name == "linear"
                             and not getattr(self.projection, "qk_norm", False) and not self.modifiers
                             and not self.positions and self.inner == self.dim == self.out_dim)

    def _check_value_width(self) -> None:
        """Values wider than the keys (``value_dim``) need a projection that sizes them and parts that never
        assume the key width on V (a value-map conv, a channel attention map)."""
        if self.value_dim == self.head_dim:
            return
        if not getattr(self.projection, "sizes_values", False):
            raise ValueError(f"projection '{self.projection.name}' makes values as wide as the keys; value_dim="
                             f"{self.value_dim} (head_dim {self.head_dim}) needs one that sizes them (linear_norm)")
        for p in (self.core, *self.positions):
            if p.value_map or not getattr(p, "token_modifiers", True):
                raise ValueError(f"{p.kind} '{p.name}' needs values as wide as the keys ({self.head_dim} per head); "
                                 f"this attention's values are {self.value_dim} wide (value_dim, e.g. LeViT's "
                                 "attn_ratio): use a softmax-family core (softmax, cosine)")

    def extra_repr(self) -> str:
        parts = [self.projection, self.grouping, self.core, *self.modifiers, *self.positions]
        return f"dim={self.dim}, heads={self.num_heads}, head_dim={self.head_dim}, parts=[{', '.join(map(repr, parts))}]"

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """``(B, N, dim)`` tokens laid out as ``layout`` -> ``(B, Nq, out_dim)`` (``Nq = N`` unless the
        grouping asks with the prefix tokens only)."""
        layout = layout or self.layout
        mask = getattr(layout, "mask", None)
        if mask is not None and not self.core.takes_bias:
            raise ValueError(f"core '{self.core.name}' cannot take the layout's attention mask (it takes no additive "
                             "logit bias); use a softmax-family core (softmax, cosine)")
        y = self.core.fast_forward(self, x, layout) if mask is None else None
        if y is not None:
            return y
        xq, xkv, state = self.grouping.inputs(self, x, layout)
        on_map = getattr(self.projection, "takes_layout", False)  # a projection that convolves the map (CvT)
        q, k, v = self.core.prepare(self, *self.projection(self, xq, xkv, *((layout,) if on_map else ())))
        branches = self.grouping.branches(self, q, k, v, layout, state)
        branches = self.projection.on_branches(self, branches) if on_map else branches  # e.g. strided keys' grid
        for p in self.positions:  # position parts that move q and k before the core (RoPE)
            branches = [p.on_qk(self, b) for b in branches] if hasattr(p, "on_qk") else branches
        outs = self._attend_branches(branches, mask)
        y = self.proj_drop(self.proj(self.grouping.merge(self, outs, layout, state)))
        return self.grouping.outputs(self, y, state)

    def _attend_branches(self, branches: List[Branch], mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        first = branches[0]
        same = all(b.q.shape == first.q.shape and b.k.shape == first.k.shape for b in branches)
        if len(branches) > 1 and same and not any(p.logit_bias for p in self.positions):
            # groups of one shape (CSwin's stripes on a square map): one call over all heads
            merged = Branch(*(torch.cat([getattr(b, t) for b in branches], dim=1) for t in "qkv"),
                            slice(0, self.num_heads), None, first.num_prefix)  # no one grid: stripes of two shapes
            outs = list(self._attend(merged, mask).split(first.q.shape[1], dim=1))
        else:
            outs = [self._attend(b, mask) for b in branches]
        return [self._finish(b, o) for b, o in zip(branches, outs)]

    def _bias(self, branch: Branch) -> Optional[torch.Tensor]:
        """Position biases plus the grouping's mask, in their own dtype (float32 tables stay float32: the fused
        path casts to the call's dtype, the explicit one adds them to float32 logits)."""
        bias = None
        for p in self.positions:
            b = p.bias(self, branch)
            if b is not None:
                bias = b if bias is None else bias + b
        return self.grouping.with_mask(self, bias, branch)

    def _mask_bias(self, br: Branch, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The layout's attention mask as an additive ``(B, 1, Nq, Nk)`` logit bias (0: attend, -inf: not)."""
        if mask is None:
            return None
        b, nq, nk = br.q.shape[0], br.q.shape[-2], br.k.shape[-2]
        if mask.shape[0] != b or mask.shape[-1] != nk or (mask.ndim == 3 and mask.shape[1] < nq):
            raise ValueError(f"an attention mask of shape {tuple(mask.shape)} does not fit grouping "
                             f"'{self.grouping.name}' ({b} groups, {nq} queries, {nk} keys); a mask needs a grouping "
                             "that keeps the tokens (global, class_query)")
        m = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :nq]  # prefix-only queries: first rows
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=br.q.dtype, device=m.device).masked_fill_(~m, float("-inf"))
        return m.to(br.q.dtype)

    def _attend(self, br: Branch, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The only fused-vs-explicit branch of vitlab's attention; ``mask`` is the layout's."""
        bias, keep = self._bias(br), self._mask_bias(br, mask)
        if not (self.recording or self._needs_matrix or _explicit_is_faster(br, bias, keep)):
            bias = bias if bias is None else bias.to(br.q.dtype)
            if keep is not None:
                bias = keep if bias is None else bias + keep
            out = self.core.fused(self, br.q, br.k, br.v, bias, self.attn_drop.p if self.training else 0.0)
            for m in self.modifiers:
                out = m.on_output(self, out, br.v, br.heads)
            return out
        logits = self.core.logits(self, br.q, br.k)
        if logits.dtype in (torch.bfloat16, torch.float16):  # bias and softmax in float32 (as timm's float32 tables)
            logits = logits.float()
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        for m in self.modifiers:
            logits = m.on_logits(self, logits, br.heads)
        if keep is not None:  # after the logit modifiers: heads mixing -inf logits would give NaN
            logits = logits + keep
        probs = self.core.normalize(self, logits)
        for m in self.modifiers:
            probs = m.on_probs(self, probs, br.heads)
        self._record(probs, TokenLayout(br.grid, br.num_prefix) if br.grid is not None else None)
        return self.attn_drop(probs).to(br.v.dtype) @ br.v

    def _finish(self, br: Branch, out: torch.Tensor) -> torch.Tensor:
        for part in (self.core, *self.positions):
            t = part.value_term(self, br)
            if t is not None:
                out = out + t
        for p in (self.core, *self.positions):  # a core's own output step (differential attention's sub-norm)
            out = p.finish(self, out, br)
        return out

    @property
    def scale(self) -> float:
        """The float the fused kernel multiplies ``q . k`` by (the core's)."""
        return self.core.scale(self)

    @property
    def part_names(self) -> Dict[str, Any]:
        return dict(projection=self.projection.name, grouping=self.grouping.name, core=self.core.name,
                    modifiers=tuple(m.name for m in self.modifiers), position=tuple(p.name for p in self.positions))
