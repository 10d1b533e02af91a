"""Focused linear attention (``focused_linear``): linear cost in the number of tokens."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attention import Attention
from vitlab.layers.inplace import chunkable

__all__ = ["FocusedLinearAttention", "focusing_function"]


def focusing_function(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """``f_p(x) = |x| / |x**p| * x**p`` over the last axis (keeps the norm, sharpens the direction).

    From "FLatten Transformer: Vision Transformer using Focused Linear Attention" (Han et al.,
    ICCV 2023), eq. for the focusing function; expects non-negative ``x`` (after ReLU).
    """
    xp = x ** p
    return xp * (x.norm(dim=-1, keepdim=True) / xp.norm(dim=-1, keepdim=True))


class FocusedLinearAttention(Attention):
    """Focused linear attention with depthwise-conv rank restoration.

    From "FLatten Transformer: Vision Transformer using Focused Linear Attention" (Han et al.,
    ICCV 2023).  Order of operations follows the released code (spec ``flatten.md`` section 3):
    a zero-initialised learnable position encoding on K, ``ReLU + 1e-6``, division by
    ``softplus(scale)`` (learnable per channel, init 0), the focusing function over the full
    channel axis, then per head ``out_i = q_i (K^T V / n) / (q_i . mean_j k_j + 1e-6)``, plus a
    depthwise ``kernel_size`` conv on V (weights shared by all heads) over the token map.

    Cost is O(N d^2) per head.  When recording, the implied row-normalised N x N matrix
    ``phi(Q) phi(K)^T`` is handed out (the DWC term is a separate local operator).

    Tokens: ``num_prefix`` leading tokens (class tokens) take part in attention but not in the
    DWC, which runs on the ``hw`` grid of the remaining tokens.  ``num_tokens`` sizes the
    position encoding on K; without it, no position encoding is used.

    Without autograd and above ``chunk_tokens`` tokens, the forward pass walks the tokens in
    chunks of that size (:meth:`_chunked`): every per-token temporary (q, k, their feature maps)
    lives in the cache for one chunk instead of streaming whole ``N x C`` tensors through memory
    a dozen times, so the time stays linear in N once the tensors outgrow the cache.
    """

    chunk_tokens: int = 1024  # tokens per chunk of the no-autograd path (0: never chunk)

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, focusing_factor: float = 3.0, kernel_size: int = 5,
                 num_tokens: Optional[int] = None, **_unused):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.focusing_factor = focusing_factor
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)
        self.scale_param = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_enc = nn.Parameter(torch.zeros(1, num_tokens, dim)) if num_tokens else None

    def _phi_qk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(qkv (B, N, 3C), phi([q, k]) (B, N, 2, C))``: the kernel feature map of q and k,
        computed for both in one pass of each elementwise op (fewer kernel launches)."""
        b, n, c = x.shape
        qkv = self.qkv(x)
        qk = qkv[..., :2 * c]
        if self.pos_enc is not None:
            if self.pos_enc.shape[1] != n:
                raise ValueError(f"FocusedLinearAttention was built for {self.pos_enc.shape[1]} tokens, got {n}")
            qk = qk + F.pad(self.pos_enc, (c, 0))  # position encoding on K only
        qk = qk.unflatten(-1, (2, c))
        inv = 1.0 / F.softplus(self.scale_param)
        # (relu(t) + 1e-6) / softplus(s) as one fused multiply-add
        t = torch.addcmul(1e-6 * inv, F.relu(qk), inv)
        return qkv, focusing_function(t, self.focusing_factor)

    def _features(self, x: torch.Tensor, num_prefix: int = 0):
        """``phi(q), phi(k), v`` split into heads, each ``(B, heads, N, head_dim)``."""
        b, n, c = x.shape
        qkv, phi = self._phi_qk(x)
        q, k = phi.unflatten(-1, (self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        v = qkv[..., 2 * c:].reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _dwc(self, v: torch.Tensor, hw: Optional[Tuple[int, int]], num_prefix: int) -> torch.Tensor:
        b, h, n, d = v.shape
        vp = v[:, :, num_prefix:]
        hw = self._grid(n - num_prefix, hw)
        fm = vp.reshape(b * h, hw[0], hw[1], d).permute(0, 3, 1, 2)
        out = self.dwc(fm).permute(0, 2, 3, 1).reshape(b, h, hw[0] * hw[1], d)
        if num_prefix:
            out = torch.cat([out.new_zeros(b, h, num_prefix, d), out], dim=2)
        return out

    def implied_attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The N x N matrix the forward pass applies to V: ``phi(Q) phi(K)^T`` with each row
        divided by its sum plus ``n * 1e-6`` (the released code's normaliser, so rows sum to
        just under 1)."""
        a = q @ k.transpose(-2, -1)
        return a / (a.sum(dim=-1, keepdim=True) + k.shape[-2] * 1e-6)

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, num_prefix: int = 0,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if bias is not None:
            raise ValueError("focused_linear attention cannot take an additive attention bias/mask "
                             "(it never forms the N x N matrix)")
        b, n, c = x.shape
        if self.recording:  # the reference path: the implied N x N matrix, recorded, applied to V
            q, k, v = self._features(x, num_prefix)
            probs = self.implied_attention(q, k)
            self._record(probs)
            out = probs @ v + self._dwc(v, hw, num_prefix)
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        if 0 < self.chunk_tokens < n and chunkable(x, self.qkv):
            return self.proj_drop(self.proj(self._chunked(x, hw, num_prefix)))
        return self.proj_drop(self.proj(self._fast(x, hw, num_prefix)))

    def _phi_chunk(self, t: torch.Tensor, inv: torch.Tensor, eps_inv: torch.Tensor) -> torch.Tensor:
        """``phi`` of one chunk of q or k, ``(L, C)``, overwriting ``t`` (a fresh projection output)."""
        t = torch.addcmul(eps_inv, t.relu_(), inv)  # (relu(t) + 1e-6) / softplus(s)
        return focusing_function(t, self.focusing_factor)

    def _chunked(self, x: torch.Tensor, hw: Optional[Tuple[int, int]], num_prefix: int) -> torch.Tensor:
        """Same result as :meth:`_fast` (``(B, N, C)`` before the projection), in two passes over
        token chunks per image: (1) project k and v, accumulate ``phi(K)^T V`` and ``sum_j phi(k_j)``,
        keep v for the DWC; (2) project q and write ``phi(q) (K^T V / n) / (phi(q) . mean_j k_j + 1e-6)``
        straight into the output.  No autograd, no autocast (callers check)."""
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        if self.pos_enc is not None and self.pos_enc.shape[1] != n:
            raise ValueError(f"FocusedLinearAttention was built for {self.pos_enc.shape[1]} tokens, got {n}")
        w = self.qkv.weight
        bias = self.qkv.bias if self.qkv.bias is not None else w.new_zeros(3 * c)
        (wq, wk, wv), (bq, bk, bv) = w.split(c), bias.split(c)
        inv = (1.0 / F.softplus(self.scale_param)).reshape(c)
        eps_inv = 1e-6 * inv
        step = self.chunk_tokens
        x = x.contiguous()
        v = x.new_empty(b, n, c)
        kv = x.new_zeros(b, h, d, d)
        ksum = x.new_zeros(b, h, d)
        for i in range(b):
            for s in range(0, n, step):
                xs = x[i, s:s + step]
                k = torch.addmm(bk, xs, wk.t())
                if self.pos_enc is not None:
                    k += self.pos_enc[0, s:s + step]
                k = self._phi_chunk(k, inv, eps_inv).view(-1, h, d)
                vs = torch.addmm(bv, xs, wv.t(), out=v[i, s:s + step]).view(-1, h, d)
                kv[i].baddbmm_(k.permute(1, 2, 0), vs.transpose(0, 1))  # (h, d, L) @ (h, L, d)
                ksum[i] += k.sum(0)
        kv *= 1.0 / n
        ksum *= 1.0 / n
        out = x.new_empty(b, n, c)
        for i in range(b):
            for s in range(0, n, step):
                q = self._phi_chunk(torch.addmm(bq, x[i, s:s + step], wq.t()), inv, eps_inv).view(-1, h, d)
                num = torch.bmm(q.transpose(0, 1), kv[i])  # (h, L, d)
                den = (q * ksum[i]).sum(-1, keepdim=True).add_(1e-6)  # (L, h, 1)
                torch.div(num.transpose(0, 1), den, out=out[i, s:s + step].view(-1, h, d))
        grid = self._grid(n - num_prefix, hw)
        vmap = v[:, num_prefix:].unflatten(1, grid).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        wd = self.dwc.weight.repeat(h, 1, 1, 1)
        bd = self.dwc.bias.repeat(h) if self.dwc.bias is not None else None
        dw = F.conv2d(vmap, wd, bd, padding=self.dwc.padding, groups=c).permute(0, 2, 3, 1)
        out[:, num_prefix:] += dw.reshape(b, -1, c)
        return out

    def _fast(self, x: torch.Tensor, hw: Optional[Tuple[int, int]], num_prefix: int) -> torch.Tensor:
        """Linear-cost path, ``(B, N, C)`` before the projection.  V gets a column of ones, so that one
        ``phi(K)^T [V, 1] / n`` product gives both the numerator ``K^T V / n`` and the normaliser
        ``mean_j phi(k_j)`` (same math as ``q (K^T V / n) / (q . mean_j k_j + 1e-6)``); the DWC runs on
        the token map in channels-last layout with its per-head weights tiled over the heads."""
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        qkv, phi = self._phi_qk(x)
        q, k = phi.unflatten(-1, (h, d)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        v = qkv[..., 2 * c:]
        v1 = torch.cat([v.unflatten(-1, (h, d)), v.new_ones(b, n, h, 1)], dim=-1).transpose(1, 2)
        kv1 = (k.transpose(-2, -1) @ v1) * (1.0 / n)  # (B, h, d, d + 1)
        num = q @ kv1  # (B, h, N, d + 1)
        out = num[..., :d] / (num[..., d:] + 1e-6)
        out = out.transpose(1, 2).reshape(b, n, c)
        grid = self._grid(n - num_prefix, hw)
        vmap = v[:, num_prefix:].unflatten(1, grid).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        w = self.dwc.weight.repeat(h, 1, 1, 1)
        bias = self.dwc.bias.repeat(h) if self.dwc.bias is not None else None
        dw = F.conv2d(vmap, w, bias, padding=self.dwc.padding, groups=c).permute(0, 2, 3, 1).reshape(b, -1, c)
        if num_prefix:
            dw = F.pad(dw, (0, 0, num_prefix, 0))  # class tokens take no DWC term
        return out + dw

    @staticmethod
    def _grid(m: int, hw: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        if hw is None:
            side = math.isqrt(m)
            if side * side != m:
                raise ValueError(f"cannot infer a square token grid from {m} tokens; pass hw=(H, W)")
            return side, side
        if hw[0] * hw[1] != m:
            raise ValueError(f"hw={tuple(hw)} holds {hw[0] * hw[1]} tokens, but {m} non-prefix tokens were given")
        return tuple(hw)
