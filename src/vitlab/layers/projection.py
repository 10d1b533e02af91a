"""Projection parts: where queries, keys and values come from (DESIGN.md, "projection")."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from vitlab.layers.attn_parts import PROJECTIONS, AttentionPart
from vitlab.layers.linear import Linear, linear
from vitlab.layers.norm import NORMS, create_norm

__all__ = ["LinearProjection", "QKVProjection", "QVBiasProjection", "SeparateProjection", "SeparateQVBiasProjection",
           "split_heads"]

Tensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * d)`` -> ``(B, heads, N, d)``."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


class _Projection(AttentionPart):
    kind = "projection"

    def __call__(self, host, xq: torch.Tensor, xkv: torch.Tensor) -> Tensors:
        """``q (B, H, Nq, d)``, ``k, v (B, H, Nk, d)`` from query tokens ``xq`` and key/value tokens
        ``xkv`` (the same tensor unless the grouping reduces or selects tokens)."""
        raise NotImplementedError


@PROJECTIONS.register("linear")
class LinearProjection(_Projection):
    """One ``qkv`` Linear (ViT, Dosovitskiy et al., ICLR 2021; timm's ``Attention``), optional
    per-head qk norm ("Scaling Vision Transformers to 22 Billion Parameters", Dehghani et al.,
    2023) as ``q_norm`` / ``k_norm``: ``qk_norm=True`` is their LayerNorm (eps 1e-5, timm's), a
    :data:`~vitlab.layers.norm.NORMS` name picks another norm with eps 1e-6 (``"rms"``: ViT-5's RMSNorm)."""

    def __init__(self, qkv_bias: bool = True, qk_norm: Union[bool, str] = False):
        if isinstance(qk_norm, str) and qk_norm not in NORMS:
            raise ValueError(f"qk_norm must be a bool or a norm name ({', '.join(NORMS)}), got {qk_norm!r}")
        self.qkv_bias, self.qk_norm = qkv_bias, qk_norm

    linear_bias = True  # whether the qkv Linear itself carries the bias (subclasses keep it elsewhere)

    def setup(self, host) -> None:
        host.qkv = Linear(host.dim, 3 * host.inner, bias=self.qkv_bias and self.linear_bias)
        host.q_norm, host.k_norm = (self._qk_norm(host.head_dim) for _ in range(2))

    def _qk_norm(self, dim: int) -> nn.Module:
        if isinstance(self.qk_norm, str):
            return create_norm(self.qk_norm, dim, eps=1e-6)
        return nn.LayerNorm(dim) if self.qk_norm else nn.Identity()

    def weights(self, host) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fused ``[q; k; v]`` weight and bias."""
        return host.qkv.weight, host.qkv.bias

    def __call__(self, host, xq, xkv):
        h, d = host.num_heads, host.head_dim
        w, bias = self.weights(host)
        if xq is xkv:
            b, n, _ = xq.shape
            q, k, v = linear(xq, w, bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # queries and keys from different tokens: the same weights, split
            wq, wkv = w.split([host.inner, 2 * host.inner])
            bq, bkv = bias.split([host.inner, 2 * host.inner]) if bias is not None else (None, None)
            q = split_heads(linear(xq, wq, bq), h)
            k, v = (split_heads(t, h) for t in linear(xkv, wkv, bkv).chunk(2, dim=-1))
        return host.q_norm(q), host.k_norm(k), v


@PROJECTIONS.register("q_kv")
class QKVProjection(_Projection):
    """A ``q`` Linear for the queries and a ``kv`` Linear for keys and values (PVT, Wang et al.,
    ICCV 2021; names as timm's ``pvt_v2``)."""

    def __init__(self, qkv_bias: bool = True):
        self.qkv_bias = qkv_bias

    def setup(self, host) -> None:
        host.q = Linear(host.dim, host.inner, bias=self.qkv_bias)
        host.kv = Linear(host.dim, 2 * host.inner, bias=self.qkv_bias)

    def __call__(self, host, xq, xkv):
        b, nk, _ = xkv.shape
        k, v = host.kv(xkv).reshape(b, nk, 2, host.num_heads, host.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return split_heads(host.q(xq), host.num_heads), k, v


@PROJECTIONS.register("separate")
class SeparateProjection(_Projection):
    """Three Linears ``q``, ``k``, ``v`` (CaiT's class attention, Touvron et al., ICCV 2021; names as
    timm's ``ClassAttn``)."""

    names = ("q", "k", "v")  # the host's attributes for the three Linears
    key_bias = True  # whether k has a bias when qkv_bias does

    def __init__(self, qkv_bias: bool = True):
        self.qkv_bias = qkv_bias

    def setup(self, host) -> None:
        for name, bias in zip(self.names, (True, self.key_bias, True)):
            setattr(host, name, Linear(host.dim, host.inner, bias=self.qkv_bias and bias))

    def __call__(self, host, xq, xkv):
        h = host.num_heads
        q, k, v = (getattr(host, name) for name in self.names)
        return split_heads(q(xq), h), split_heads(k(xkv), h), split_heads(v(xkv), h)


@PROJECTIONS.register("separate_qv_bias")
class SeparateQVBiasProjection(SeparateProjection):
    """Three Linears ``q_proj``, ``k_proj``, ``v_proj`` with biases on q and v only: the unfused form of BEiT's
    q/v bias (``linear_qv_bias``) that EVA-02's base and large models use ("EVA-02: A Visual Representation for
    Neon Genesis", Fang et al., 2023; names as timm's ``EvaAttention(qkv_fused=False)``)."""

    names = ("q_proj", "k_proj", "v_proj")
    key_bias = False


@PROJECTIONS.register("linear_qv_bias")
class QVBiasProjection(LinearProjection):
    """One bias-free ``qkv`` Linear plus biases on q and v only, ``q_bias`` / ``v_bias`` with a fixed zero
    ``k_bias`` buffer (not saved): BEiT's attention ("BEiT: BERT Pre-Training of Image Transformers", Bao, Dong,
    Piao & Wei, ICLR 2022, code) kept by EVA/EVA-02 (Fang et al., 2023); names as timm's ``EvaAttention`` /
    ``beit.Attention``.  A key bias only adds ``q . b_k`` to a whole row of logits, so softmax ignores it unless
    q and k are rotated (RoPE); ``qkv_bias=False`` is the plain bias-free ``linear``."""

    linear_bias = False

    def setup(self, host) -> None:
        super().setup(host)
        if self.qkv_bias:
            host.q_bias = nn.Parameter(torch.zeros(host.inner))
            host.register_buffer("k_bias", torch.zeros(host.inner), persistent=False)
            host.v_bias = nn.Parameter(torch.zeros(host.inner))

    def weights(self, host) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        bias = torch.cat([host.q_bias, host.k_bias, host.v_bias]) if self.qkv_bias else None
        return host.qkv.weight, bias
