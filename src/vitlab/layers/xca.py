"""Cross-covariance attention (the ``cross_covariance`` core and mixer): a d x d attention over channels.

"XCiT: Cross-Covariance Image Transformers" (El-Nouby, Touvron, Caron, Bojanowski, Douze, Joulin, Laptev,
Neverova, Synnaeve, Verbeek, Jegou; NeurIPS 2021), sec. 3.2, eq. (3)-(4): per head, with ``q, k, v`` the
``(N, d)`` token matrices, ``q`` and ``k`` L2-normalised along the tokens (each channel a unit vector over
the N tokens),

    XC-Attention(q, k, v) = v softmax(tau_h * q^T k)^T        (the d x d attention A_h = softmax(tau_h q^T k))

so channel ``i`` of the output is ``sum_j A_h[i, j] v[:, j]``: cost O(N d^2), linear in the tokens; the N x N
matrix never exists.  The learnable temperature ``tau`` (heads, 1, 1) lives on the host as ``temperature``
(timm's key).  Inside :func:`~vitlab.layers.record_attention` the host records the ``(B', h, d, d)`` channel
attention (layout ``None``: its rows and columns are channels, not tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import CORES
from vitlab.layers.cores import Core
from vitlab.layers.mixers import MIXERS, attention_shorthand

__all__ = ["CrossCovarianceCore", "channel_attention"]


def channel_attention(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``softmax(temperature * q^T k)`` per head, ``(B, h, d, d)``, from token-normalised ``q, k`` of shape
    ``(B, h, N, d)`` and ``temperature`` broadcastable to ``(h, 1, 1)``."""
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"cross-covariance attention needs queries and keys over the same tokens, got "
                         f"{q.shape[-2]} query and {k.shape[-2]} key tokens")
    return (q.transpose(-2, -1) @ k * temperature).softmax(dim=-1)


@CORES.register("cross_covariance")
class CrossCovarianceCore(Core):
    """XCiT's cross-covariance attention (El-Nouby et al., NeurIPS 2021, sec. 3.2); see the module docstring.

    Capabilities: ``forms_matrix = False`` (modifiers that need the N x N matrix are refused),
    ``takes_bias = False`` (no logit bias, no shifted-window mask), ``linear_cost = True`` (families give it
    the whole map, as they do FLatten).  Queries and keys must cover the same tokens: class-token queries
    are refused when the attention is built, spatially reduced keys when it runs.
    """

    forms_matrix = False
    takes_bias = False
    linear_cost = True
    token_modifiers = False  # its map is channels x channels: no modifier of token attention applies

    def setup(self, host) -> None:
        if getattr(host.grouping, "queries_prefix_only", False):
            raise ValueError(f"core 'cross_covariance' cannot be combined with grouping '{host.grouping.name}': "
                             "it needs queries and keys over the same tokens")
        host.temperature = nn.Parameter(torch.ones(host.num_heads, 1, 1))

    def prepare(self, host, q, k, v):
        # sec. 3.2: unit-norm channels over the tokens bound the d x d logits to [-tau, tau]
        return F.normalize(q, dim=-2), F.normalize(k, dim=-2), v

    def logits(self, host, q, k):
        raise ValueError("core 'cross_covariance' forms no N x N logits; its d x d attention is "
                         "vitlab.layers.xca.channel_attention")

    def attend(self, host, q, k, v, heads: slice, dropout: Optional[nn.Module] = None) -> torch.Tensor:
        """``v A^T`` with ``A`` the channel attention of the heads ``heads``, ``(B', h, N, d)``; records ``A``."""
        probs = channel_attention(q, k, host.temperature[heads])
        host._record(probs, None)
        return v @ (dropout(probs) if dropout is not None else probs).transpose(-2, -1)

    def fused(self, host, q, k, v, bias, dropout_p):
        if q.shape[1] != host.num_heads:  # a branch of some heads: the caller must say which (fast_forward does)
            raise ValueError(f"cross_covariance got {q.shape[1]} of {host.num_heads} heads without their index")
        drop = (lambda a: F.dropout(a, dropout_p, training=True)) if dropout_p > 0 else None
        return self.attend(host, q, k, v, slice(0, host.num_heads), drop)

    def fast_forward(self, host, x: torch.Tensor, layout) -> torch.Tensor:
        """The host's forward with :meth:`attend` per branch (a branch's heads pick their temperatures; the
        ``(B', h, d, d)`` attention is recorded when the host records)."""
        xq, xkv, state = host.grouping.inputs(host, x, layout)
        q, k, v = self.prepare(host, *host.projection(host, xq, xkv))
        outs = [host._finish(br, self.attend(host, br.q, br.k, br.v, br.heads, host.attn_drop))
                for br in host.grouping.branches(host, q, k, v, layout, state)]
        y = host.proj_drop(host.proj(host.grouping.merge(host, outs, layout, state)))
        return host.grouping.outputs(host, y, state)


MIXERS.register("cross_covariance")(attention_shorthand("cross_covariance"))
