"""Attention cores: q, k, v -> output (DESIGN.md, "core"): ``softmax`` and ``cosine`` here,
``focused_linear`` in :mod:`vitlab.layers.linear_attention`.

A core offers both paths of :class:`vitlab.layers.mha.MultiHeadAttention`: :meth:`fused` (no N x N
matrix, e.g. SDPA) and the explicit one (:meth:`logits`, :meth:`normalize`, then ``probs @ v``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import CORES, AttentionPart

__all__ = ["Core", "SoftmaxCore", "CosineCore"]


class Core(AttentionPart):
    """Softmax attention ``softmax(q k^T * scale + bias) v`` ("Attention Is All You Need", Vaswani et
    al., 2017), fused through ``scaled_dot_product_attention``.  Subclasses change the scale, prepare
    q/k/v (:meth:`prepare`) or replace the kernel."""

    kind = "core"
    forms_matrix = True
    takes_bias = True
    linear_cost = False

    def scale(self, host) -> float:
        qk_scale = getattr(host, "qk_scale", None)  # the host's override (CvT's official dim ** -0.5)
        return host.head_dim ** -0.5 if qk_scale is None else qk_scale

    def prepare(self, host, q, k, v) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split-head ``q, k, v`` as the kernel needs them (default: unchanged)."""
        return q, k, v

    def logits(self, host, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q * self.scale(host)) @ k.transpose(-2, -1)

    def normalize(self, host, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1)

    def fused(self, host, q, k, v, bias: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scale(host))

    def value_term(self, host, branch) -> Optional[torch.Tensor]:
        """A term added to the branch output, ``(B', h, Nq, d)`` (e.g. FLatten's depthwise conv)."""
        return None

    def finish(self, host, out: torch.Tensor, branch) -> torch.Tensor:
        """The branch output ``(B', h, Nq, d)`` after the value terms, before position parts' ``finish``."""
        return out

    def fast_forward(self, host, x: torch.Tensor, layout) -> Optional[torch.Tensor]:
        """A whole-module shortcut for plain configurations (``None``: use the general path)."""
        return None


@CORES.register("softmax")
class SoftmaxCore(Core):
    """Scaled dot-product softmax attention, scale ``head_dim ** -0.5`` (ViT)."""


@CORES.register("cosine")
class CosineCore(Core):
    """Scaled cosine attention: logits ``tau * cos(q_i, k_j)`` ("LipsFormer: Introducing Lipschitz
    Continuity to Vision Transformers", Qi et al., ICLR 2023).  ``tau`` is 10 (Swin code) or 12 (CSwin
    code), fixed unless ``learn_tau``.  ``eps`` puts the paper's epsilon inside the norms
    (``q / sqrt(|q|^2 + eps)``, globally Lipschitz); ``eps=0`` is the released code's ``F.normalize``.
    ``normalize_v`` also normalises V (paper form).  The host holds ``tau``.

    ``learn_logit_scale`` gives each head its own learnable temperature, ``exp(min(logit_scale, log(max_logit_scale)))``
    with ``logit_scale`` ``(heads, 1, 1)`` on the host starting at ``log(tau)`` ("Swin Transformer V2: Scaling Up
    Capacity and Resolution", Liu et al., CVPR 2022, sec. 3.2, eq. 2: tau > 0.01, i.e. ``max_logit_scale=100``;
    names as timm's).  ``host.tau`` then holds ``max_logit_scale``, the bound every head's temperature stays under."""

    def __init__(self, tau: float = 10.0, learn_tau: bool = False, normalize_v: bool = False, eps: float = 0.0,
                 learn_logit_scale: bool = False, max_logit_scale: float = 100.0):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if learn_logit_scale and (learn_tau or not tau > 0 or not max_logit_scale > 0):
            raise ValueError(f"learn_logit_scale needs learn_tau=False and tau, max_logit_scale > 0; got learn_tau="
                             f"{learn_tau}, tau={tau}, max_logit_scale={max_logit_scale}")
        self.tau, self.learn_tau, self.normalize_v, self.eps = float(tau), learn_tau, normalize_v, eps
        self.learn_logit_scale, self.max_logit_scale = learn_logit_scale, float(max_logit_scale)

    def setup(self, host) -> None:
        if self.learn_logit_scale:
            host.logit_scale = nn.Parameter(torch.full((host.num_heads, 1, 1), math.log(self.tau)))
            host.register_buffer("tau", torch.tensor(self.max_logit_scale), persistent=False)
        elif self.learn_tau:
            host.tau = nn.Parameter(torch.tensor(self.tau))
        else:
            host.register_buffer("tau", torch.tensor(self.tau), persistent=False)

    def head_scale(self, host) -> torch.Tensor:
        """The per-head temperature ``(heads, 1, 1)``: the learned logit scale, clamped above, exponentiated."""
        return torch.clamp(host.logit_scale, max=math.log(self.max_logit_scale)).exp()

    def _normalize(self, t: torch.Tensor) -> torch.Tensor:
        if self.eps > 0:
            return t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + self.eps)
        return F.normalize(t, dim=-1)

    def prepare(self, host, q, k, v):
        q, k = self._normalize(q), self._normalize(k)
        if self.learn_logit_scale:  # per head, folded into q as below
            q = q * self.head_scale(host).to(q.dtype)
        elif self.learn_tau:  # SDPA's scale is a float: fold a learnable tau into q to keep its gradient
            q = q * host.tau
        return q, k, (self._normalize(v) if self.normalize_v else v)

    def scale(self, host) -> float:
        learned = self.learn_tau or self.learn_logit_scale
        return 1.0 if learned else self.tau  # a python float: no device sync, works on 'meta'
