"""Differential attention as an attention core: ``differential``.

"Differential Transformer" (Ye, Dong, Xia, Sun, Zhu, Huang & Wei, ICLR 2025, sec. 2.1): each head splits its
queries and keys into two halves ``[Q1; Q2]``, ``[K1; K2]`` (width ``d = head_dim / 2``) and attends with the
difference of two softmax maps over the same values (width ``2d``)::

    DiffAttn(X) = (softmax(Q1 K1^T / sqrt(d)) - lambda * softmax(Q2 K2^T / sqrt(d))) V
    lambda      = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init
    lambda_init = 0.8 - 0.6 * exp(-0.3 * (l - 1))        (l: the layer, 1-based)

then each head's output goes through a sub-norm (RMSNorm over its ``2d`` channels, one weight shared by the
heads, eps 1e-5) times ``(1 - lambda_init)`` before the output projection (sec. 2.2).  The tensors live on the
host attention under timm's names (``lambda_q1``, ``lambda_k1``, ``lambda_q2``, ``lambda_k2``, ``sub_norm``, the
float ``lambda_init``; timm's ``DiffAttention``), so any projection and grouping can feed it.

The explicit path stacks the two logit maps as ``(2, B', h, Nq, Nk)`` so that every bias and mask broadcasts
over both; :meth:`DifferentialCore.normalize` returns the differential map ``(B', h, Nq, Nk)`` (what modifiers
acting on probabilities and :func:`~vitlab.layers.record_attention` see; it has negative entries).

``lambda_init`` depends on the block: :func:`number_differential_layers` sets it from each attention's order in a
model (``create_model`` calls it for every family); a core built alone uses ``layer_index`` (default 0, the first
layer's 0.2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import CORES
from vitlab.layers.cores import Core
from vitlab.layers.modifiers import _Modifier
from vitlab.layers.norm import RMSNorm

__all__ = ["DifferentialCore", "lambda_init_at", "number_differential_layers"]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def lambda_init_at(layer_index: int) -> float:
    """The paper's depth schedule (sec. 2.1), ``0.8 - 0.6 * exp(-0.3 * layer_index)`` for the 0-based index."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


@CORES.register("differential")
class DifferentialCore(Core):
    """Differential attention (see the module docstring).  ``lambda_init``: a fixed value in ``[0, 1)`` (the
    paper's ablation, sec. 3.8) instead of the depth schedule at ``layer_index``.  Needs an even ``head_dim``;
    refuses modifiers that mix heads' logits (the explicit path holds two logit maps per head)."""

    def __init__(self, lambda_init: Optional[float] = None, layer_index: int = 0):
        if lambda_init is not None and not 0.0 <= lambda_init < 1.0:
            raise ValueError(f"lambda_init must be in [0, 1) or None (the depth schedule), got {lambda_init!r}")
        if int(layer_index) != layer_index or layer_index < 0:
            raise ValueError(f"layer_index must be an int >= 0 (0: the first block), got {layer_index!r}")
        self.lambda_init, self.layer_index = lambda_init, int(layer_index)

    def setup(self, host) -> None:
        if host.head_dim % 2:
            raise ValueError(f"core '{self.name}' splits each head's queries and keys in two halves: head_dim must be "
                             f"even, got {host.head_dim}")
        for m in host.modifiers:  # setup runs after the modifiers are built
            if m.mixes_heads and type(m).on_logits is not _Modifier.on_logits:
                raise ValueError(f"core '{self.name}' cannot be combined with modifier '{m.name}': {self.name} forms "
                                 f"two logit maps per head (split query/key halves); {m.name} mixes the heads' logits")
        half = host.head_dim // 2
        for name in _LAMBDAS:  # timm's init: N(0, 0.1)
            setattr(host, name, nn.Parameter(torch.empty(half).normal_(0.0, 0.1)))
        host.sub_norm = RMSNorm(host.value_dim, eps=1e-5)
        host.lambda_init = lambda_init_at(self.layer_index) if self.lambda_init is None else self.lambda_init

    def scale(self, host) -> float:
        qk_scale = getattr(host, "qk_scale", None)
        return (host.head_dim // 2) ** -0.5 if qk_scale is None else qk_scale

    def weight(self, host, dtype: torch.dtype) -> torch.Tensor:
        """``lambda``, the weight of the second map (a 0-d tensor, computed in float32)."""
        l1 = torch.exp((host.lambda_q1 * host.lambda_k1).sum(-1).float())
        l2 = torch.exp((host.lambda_q2 * host.lambda_k2).sum(-1).float())
        return (l1 - l2 + host.lambda_init).to(dtype)

    def logits(self, host, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        (q1, q2), (k1, k2) = (q * self.scale(host)).chunk(2, dim=-1), k.chunk(2, dim=-1)
        return torch.stack([q1 @ k1.transpose(-2, -1), q2 @ k2.transpose(-2, -1)])  # (2, B', h, Nq, Nk)

    def normalize(self, host, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        return probs[0] - self.weight(host, probs.dtype) * probs[1]

    def fused(self, host, q, k, v, bias: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        (q1, q2), (k1, k2), s = q.chunk(2, dim=-1), k.chunk(2, dim=-1), self.scale(host)
        a1 = F.scaled_dot_product_attention(q1, k1, v, attn_mask=bias, dropout_p=dropout_p, scale=s)
        a2 = F.scaled_dot_product_attention(q2, k2, v, attn_mask=bias, dropout_p=dropout_p, scale=s)
        return a1 - self.weight(host, a1.dtype) * a2

    def finish(self, host, out: torch.Tensor, branch) -> torch.Tensor:
        """The per-head sub-norm and the ``(1 - lambda_init)`` scale on ``out (B', h, Nq, value_dim)``."""
        return host.sub_norm(out) * (1.0 - host.lambda_init)


def number_differential_layers(model: nn.Module) -> int:
    """Give every differential attention of ``model`` the ``lambda_init`` of its depth: the ``i``-th one in
    module order (block order in every vitlab backbone) gets :func:`lambda_init_at` ``(i)``, unless its core fixes
    ``lambda_init``.  Returns how many were numbered."""
    hosts = [m for m in model.modules() if isinstance(getattr(m, "core", None), DifferentialCore)]
    for i, host in enumerate(hosts):
        if host.core.lambda_init is None:
            host.lambda_init = lambda_init_at(i)
    return len(hosts)
