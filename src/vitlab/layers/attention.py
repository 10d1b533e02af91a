"""Softmax-family token mixers: ``softmax``, ``cosine`` and ``attnscale``.

All run on ``torch.nn.functional.scaled_dot_product_attention`` (the fused fast path)
unless attention is being recorded, in which case the probabilities are formed explicitly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.recording import RecordsAttention

__all__ = ["Attention", "CosineAttention", "AttnScale"]


class AttnScale(nn.Module):
    """AttnScale: ``A_hat = A + omega_h * (A - 1/N)``, one learnable ``omega`` per head (init 0).

    From "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis:
    From Theory to Practice" (Wang et al., ICLR 2022).  Since every row of ``A`` sums to 1,
    ``A_hat @ V = A @ V + omega * (A @ V - mean_j V_j)``, so the fused SDPA path needs no N x N
    matrix: :meth:`apply_to_output` does the same thing on the attention output.
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.omega = nn.Parameter(torch.zeros(num_heads))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Re-weight probabilities ``(B, H, Nq, Nk)``."""
        w = self.omega.view(1, -1, 1, 1).to(probs.dtype)
        return probs + w * (probs - 1.0 / probs.shape[-1])

    def apply_to_output(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Same operator applied after ``A @ V``: ``out (B, H, Nq, d)``, ``v (B, H, Nk, d)``."""
        w = self.omega.view(1, -1, 1, 1).to(out.dtype)
        return out + w * (out - v.mean(dim=-2, keepdim=True))


class Attention(RecordsAttention, nn.Module):
    """Multi-head softmax self-attention ("Attention Is All You Need", Vaswani et al., 2017;
    ViT, Dosovitskiy et al., ICLR 2021), optional qk-norm ("Scaling Vision Transformers to 22
    Billion Parameters", Dehghani et al., 2023) and optional AttnScale.  Parameter names
    (``qkv``, ``q_norm``, ``k_norm``, ``proj``) match timm's ``Attention``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_scale: bool = False,
                 norm_layer: type = nn.LayerNorm, **_unused):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_scale = AttnScale(num_heads) if attn_scale else None

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q * self.scale) @ k.transpose(-2, -1)

    def _attend(self, q, k, v, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention core on split heads; ``bias`` (broadcastable to B, H, Nq, Nk) is added to the logits."""
        if not self.recording:
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=self.scale)
            if self.attn_scale is not None:
                out = self.attn_scale.apply_to_output(out, v)
            return out
        logits = self._logits(q, k)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        if self.attn_scale is not None:
            probs = self.attn_scale(probs)
        self._record(probs)
        return self.attn_drop(probs) @ v

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, num_prefix: int = 0,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        out = self._attend(q, k, v, bias)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class CosineAttention(Attention):
    """Scaled cosine-similarity attention: logits ``tau * cos(q_i, k_j)``, fixed ``tau``.

    From "LipsFormer: Introducing Lipschitz Continuity to Vision Transformers" (Qi et al.,
    ICLR 2023).  ``tau`` is 10 (Swin code) or 12 (CSwin code), not learned unless
    ``learn_tau``.  ``eps`` puts the paper's epsilon inside the norms
    (``q / sqrt(|q|^2 + eps)``, globally Lipschitz); ``eps=0`` reproduces the released
    code's ``F.normalize``.  ``normalize_v`` also normalises V (paper form).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_scale: bool = False, tau: float = 10.0, learn_tau: bool = False,
                 normalize_v: bool = False, eps: float = 0.0, **_unused):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         attn_scale=attn_scale)
        self.normalize_v = normalize_v
        self.eps = eps
        self._tau_value = float(tau)  # a python float: no device sync, works on 'meta'
        if learn_tau:
            self.tau = nn.Parameter(torch.tensor(float(tau)))
        else:
            self.register_buffer("tau", torch.tensor(float(tau)), persistent=False)

    def _normalize(self, t: torch.Tensor) -> torch.Tensor:
        if self.eps > 0:
            return t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + self.eps)
        return F.normalize(t, dim=-1)

    def _qkv(self, x):
        q, k, v = super()._qkv(x)
        q, k = self._normalize(q), self._normalize(k)
        if self.normalize_v:
            v = self._normalize(v)
        return q, k, v

    @property
    def scale(self):
        """The float SDPA multiplies q.k by: the fixed temperature, or 1 when a learnable tau is
        folded into q (so that tau keeps its gradient)."""
        return 1.0 if isinstance(self.tau, nn.Parameter) else self._tau_value

    @scale.setter
    def scale(self, value):  # the parent's 1/sqrt(d) is not used
        pass

    def _logits(self, q, k):
        return self.tau * (q @ k.transpose(-2, -1))

    def _attend(self, q, k, v, bias=None):
        if self.recording or not isinstance(self.tau, nn.Parameter):
            return super()._attend(q, k, v, bias)
        # learnable tau: SDPA's scale must be a float, so fold tau into q to keep its gradient
        return super()._attend(q * self.tau, k, v, bias)
