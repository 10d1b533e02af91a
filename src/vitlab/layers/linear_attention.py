"""Focused linear attention (the ``focused_linear`` core): linear cost in the number of tokens."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import CORES
from vitlab.layers.cores import Core
from vitlab.layers.inplace import chunkable

__all__ = ["FocusedLinearCore", "focusing_function", "focused_feature_map", "linear_attend"]


def focusing_function(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """``f_p(x) = |x| / |x**p| * x**p`` over the last axis (keeps the norm, sharpens the direction).

    From "FLatten Transformer: Vision Transformer using Focused Linear Attention" (Han et al.,
    ICCV 2023), eq. for the focusing function; expects non-negative ``x`` (after ReLU).
    """
    rp = (x / x.amax(dim=-1, keepdim=True)) ** p  # x**p / |x**p| is scale-free: divide by the max first, so
    return rp * (x.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True))  # tiny rows do not underflow


_FOCUS_CHUNK_BYTES = 4 * 1024 * 1024  # the fused feature map walks its input in chunks of about 4 MiB


class _FeatureMap(torch.autograd.Function):
    """``phi(u) = f_p((relu(u) + 1e-6) * inv)``, the focusing function ``f_p`` over the last axis,
    forward and backward walked in row chunks that stay in the cache.  Saves only ``u`` and ``inv``;
    the backward recomputes ``t = (relu(u) + 1e-6) * inv``, ``t**p`` and the norms.  Per row, with
    ``a = |t|``, ``b = |t**p|``, ``s = a / b`` and ``G = g . t**p``::

        dL/dt   = p t**(p-1) * (s g - G a / b**3 * t**p) + G / (a b) * t
        dL/du   = dL/dt * inv * [u > 0]
        dL/dinv = sum over rows of dL/dt * (relu(u) + 1e-6)
    """

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.reshape(1, 1, -1)

    @staticmethod
    def _step(rows: torch.Tensor) -> int:
        """Rows per chunk: about ``_FOCUS_CHUNK_BYTES`` of ``rows``."""
        return max(1, _FOCUS_CHUNK_BYTES // (rows[0].numel() * rows.element_size()))

    @staticmethod
    def forward(ctx, u: torch.Tensor, inv: torch.Tensor, p: float) -> torch.Tensor:
        c = u.shape[-1]
        if inv.numel() != c:
            raise ValueError(f"inv must hold one value per channel ({c}), got shape {tuple(inv.shape)}")
        ctx.save_for_backward(u, inv)
        ctx.p = p
        rows, w = _FeatureMap._rows(u), inv.reshape(c)
        out = torch.empty(rows.shape, dtype=u.dtype, device=u.device)
        eps_w = 1e-6 * w
        step = _FeatureMap._step(rows)
        for r in range(0, rows.shape[0], step):
            t = torch.addcmul(eps_w, rows[r:r + step].relu(), w)
            rp = (t / t.amax(dim=-1, keepdim=True)).pow_(p)
            torch.mul(rp, t.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True), out=out[r:r + step])
        return out.view(u.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        u, inv = ctx.saved_tensors
        p, c = ctx.p, u.shape[-1]
        rows, grows, w = _FeatureMap._rows(u), _FeatureMap._rows(g), inv.reshape(c)
        gu = torch.empty(rows.shape, dtype=u.dtype, device=u.device)
        gw = torch.zeros(c, dtype=torch.float64 if u.dtype == torch.float64 else torch.float32, device=u.device)
        step = _FeatureMap._step(rows)
        for r in range(0, rows.shape[0], step):
            uc, gc = rows[r:r + step], grows[r:r + step]
            rl = uc.relu().add_(1e-6)
            t = rl * w
            m = t.amax(dim=-1, keepdim=True)
            rpm1 = (t / m).pow_(p - 1.0)
            e = rpm1 * t / m
            a, b = t.norm(dim=-1, keepdim=True), e.norm(dim=-1, keepdim=True)
            e /= b
            big_g = (gc * e).sum(dim=-1, keepdim=True)
            inner = (gc - e * big_g) * (a / (m * b))
            gt = torch.addcmul(t * (big_g / a), rpm1, inner, value=p)
            gw += (gt * rl).sum(dim=tuple(range(gt.dim() - 1)), dtype=gw.dtype)
            torch.mul(gt.mul_(w), uc > 0, out=gu[r:r + step])
        return gu.view(u.shape), gw.to(inv.dtype).view(inv.shape), None


def focused_feature_map(u: torch.Tensor, inv: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """FLatten's kernel feature map ``f_p((relu(u) + 1e-6) * inv)`` (``inv = 1 / softplus(scale)``,
    one value per channel) with a hand-written backward, computed in cache-sized row chunks: fewer
    passes over memory than the composed ops, and autograd keeps only ``u`` and ``inv``.  Equal to
    ``focusing_function(torch.addcmul(1e-6 * inv, relu(u), inv), p)`` (tests)."""
    return _FeatureMap.apply(u, inv, float(p))


def linear_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``q (K^T V / n) / (q . mean_j k_j + 1e-6)`` on ``(B, heads, N, d)`` feature maps and values, at
    O(N d^2): V gets a column of ones, so that one ``K^T [V, 1] / n`` product gives both the numerator
    and the normaliser."""
    n, d = k.shape[-2], v.shape[-1]
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    kv1 = (k.transpose(-2, -1) @ v1) * (1.0 / n)  # (B, h, d, d + 1)
    num, den = (q @ kv1).split([d, 1], dim=-1)  # (B, h, N, d), (B, h, N, 1)
    return num / (den + 1e-6)


def _grid(m: int, grid: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    if grid is None:
        side = math.isqrt(m)
        if side * side != m:
            raise ValueError(f"cannot infer a square token grid from {m} tokens; pass a layout")
        return side, side
    if math.prod(grid) != m:
        raise ValueError(f"grid {tuple(grid)} holds {math.prod(grid)} tokens, but {m} non-prefix tokens were given")
    return tuple(grid)


@CORES.register("focused_linear")
class FocusedLinearCore(Core):
    """Focused linear attention with depthwise-conv rank restoration.

    From "FLatten Transformer: Vision Transformer using Focused Linear Attention" (Han et al., ICCV
    2023).  Order of operations follows the released code (spec ``flatten.md`` section 3): a
    zero-initialised learnable position encoding on K (``pos_enc``, sized by the host's layout), ``ReLU
    + 1e-6``, division by ``softplus(scale_param)`` (learnable per channel, init 0), the focusing
    function over the full channel axis, then per head ``out_i = q_i (K^T V / n) / (q_i . mean_j k_j +
    1e-6)``, plus a depthwise ``kernel_size`` conv on V (``dwc``, weights shared by all heads) over the
    token map.  Cost O(N d^2) per head; the explicit path hands out the implied row-normalised N x N
    matrix ``phi(Q) phi(K)^T`` (the DWC term is a separate local operator).

    Prefix tokens take part in attention but not in the DWC.  Without autograd and above
    ``chunk_tokens`` tokens, the plain global configuration walks the tokens in chunks
    (:meth:`_chunked`): every per-token temporary lives in the cache for one chunk, so the time stays
    linear in N once the tensors outgrow the cache.
    """

    map_rank = 2  # the depthwise conv on V (dwc) reads a 2-D value map
    value_map = True  # ... and adds it to the query rows

    forms_matrix = False
    takes_bias = False
    linear_cost = True
    chunk_tokens: int = 1024  # tokens per chunk of the no-autograd path (0: never chunk)

    def __init__(self, focusing_factor: float = 3.0, kernel_size: int = 5, pos_enc: bool = True):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.focusing_factor, self.kernel_size, self.pos_enc = focusing_factor, kernel_size, pos_enc

    def setup(self, host) -> None:
        d, k = host.head_dim, self.kernel_size
        host.dwc = nn.Conv2d(d, d, k, padding=k // 2, groups=d)
        host.scale_param = nn.Parameter(torch.zeros(1, 1, host.inner))
        n = host.num_tokens if self.pos_enc else None  # a token count without a layout (standalone use)
        if self.pos_enc and host.layout is not None:
            grid, prefix = host.grouping.key_grid(host.layout)
            n = math.prod(grid) + prefix
        host.pos_enc = nn.Parameter(torch.zeros(1, n, host.inner)) if n else None

    # -- the general path ------------------------------------------------------------------------
    def _inv(self, host) -> torch.Tensor:
        return 1.0 / F.softplus(host.scale_param)

    def prepare(self, host, q, k, v):
        b, h, n, d = q.shape
        qt, kt = (t.transpose(1, 2).reshape(b, t.shape[2], h * d) for t in (q, k))
        if host.pos_enc is not None:
            self._check_tokens(host, kt.shape[1])
            kt = kt + host.pos_enc
        if qt.shape[1] == kt.shape[1]:
            phi = focused_feature_map(torch.stack([qt, kt], dim=2), self._inv(host), self.focusing_factor)
            qt, kt = phi.unbind(2)
        else:
            qt, kt = (focused_feature_map(t, self._inv(host), self.focusing_factor) for t in (qt, kt))
        q, k = (t.reshape(b, t.shape[1], h, d).transpose(1, 2) for t in (qt, kt))
        return q, k, v

    def logits(self, host, q, k):
        return q @ k.transpose(-2, -1)

    def normalize(self, host, logits):
        """The released code's normaliser: rows divided by their sum plus ``n * 1e-6``."""
        return logits / (logits.sum(dim=-1, keepdim=True) + logits.shape[-1] * 1e-6)

    def fused(self, host, q, k, v, bias, dropout_p):
        return linear_attend(q, k, v)

    def value_term(self, host, branch):
        v, p = branch.v, branch.num_prefix
        b, h, n, d = v.shape
        grid = _grid(n - p, branch.grid)
        fm = v[:, :, p:].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
        out = host.dwc(fm).permute(0, 2, 3, 1).reshape(b, h, n - p, d)
        return F.pad(out, (0, 0, p, 0)) if p else out

    # -- the plain global configuration: fused and chunked token paths --------------------------------
    def fast_forward(self, host, x, layout):
        if not host.plain_global or host.recording:
            return None
        grid = layout.grid if layout is not None else None
        p = layout.num_prefix if layout is not None else 0
        if 0 < self.chunk_tokens < x.shape[1] and chunkable(x, host.qkv):
            out = self._chunked(host, x, grid, p)
        else:
            out = self._fast(host, x, grid, p)
        return host.proj_drop(host.proj(out))

    def _phi_qk(self, host, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(v (B, N, C), phi([q, k]) (B, N, 2, C))``: the kernel feature map of q and k,
        computed for both in one pass of each elementwise op (fewer kernel launches).  The
        projection is split with ``split`` (its backward concatenates the gradients; slicing
        would zero-fill a full-size gradient once per slice)."""
        b, n, c = x.shape
        qk, v = host.qkv(x).split([2 * c, c], dim=-1)
        self._check_tokens(host, n)
        if host.pos_enc is not None:
            qk = qk + F.pad(host.pos_enc, (c, 0))  # position encoding on K only
        qk = qk.unflatten(-1, (2, c))
        # f_p((relu(qk) + 1e-6) / softplus(s)), fused and chunked (forward and backward)
        return v, focused_feature_map(qk, 1.0 / F.softplus(host.scale_param), self.focusing_factor)

    def _chunked(self, host, x: torch.Tensor, grid, num_prefix: int) -> torch.Tensor:
        """Same result as :meth:`_fast` (``(B, N, C)`` before the projection), in two passes over
        token chunks per image: (1) project k and v, accumulate ``phi(K)^T V`` and ``sum_j phi(k_j)``,
        keep v for the DWC; (2) project q and write ``phi(q) (K^T V / n) / (phi(q) . mean_j k_j + 1e-6)``
        straight into the output.  No autograd, no autocast (callers check)."""
        b, n, c = x.shape
        h, d = host.num_heads, host.head_dim
        self._check_tokens(host, n)
        w = host.qkv.weight
        bias = host.qkv.bias if host.qkv.bias is not None else w.new_zeros(3 * c)
        (wq, wk, wv), (bq, bk, bv) = w.split(c), bias.split(c)
        inv = (1.0 / F.softplus(host.scale_param)).reshape(c)
        p = self.focusing_factor
        step = self.chunk_tokens
        x = x.contiguous()
        v = x.new_empty(b, n, c)
        kv = x.new_zeros(b, h, d, d)
        ksum = x.new_zeros(b, h, d)
        for i in range(b):
            for s in range(0, n, step):
                xs = x[i, s:s + step]
                k = torch.addmm(bk, xs, wk.t())
                if host.pos_enc is not None:
                    k += host.pos_enc[0, s:s + step]
                k = focused_feature_map(k, inv, p).view(-1, h, d)
                vs = torch.addmm(bv, xs, wv.t(), out=v[i, s:s + step]).view(-1, h, d)
                kv[i].baddbmm_(k.permute(1, 2, 0), vs.transpose(0, 1))  # (h, d, L) @ (h, L, d)
                ksum[i] += k.sum(0)
        kv *= 1.0 / n
        ksum *= 1.0 / n
        out = x.new_empty(b, n, c)
        for i in range(b):
            for s in range(0, n, step):
                q = focused_feature_map(torch.addmm(bq, x[i, s:s + step], wq.t()), inv, p).view(-1, h, d)
                num = torch.bmm(q.transpose(0, 1), kv[i])  # (h, L, d)
                den = (q * ksum[i]).sum(-1, keepdim=True).add_(1e-6)  # (L, h, 1)
                torch.div(num.transpose(0, 1), den, out=out[i, s:s + step].view(-1, h, d))
        out[:, num_prefix:] += self._dwc_tokens(host, v, grid, num_prefix)
        return out

    def _fast(self, host, x: torch.Tensor, grid, num_prefix: int) -> torch.Tensor:
        """Linear-cost path, ``(B, N, C)`` before the projection: :meth:`linear_attend` on the whole
        sequence plus the DWC term (:meth:`_dwc_tokens`)."""
        b, n, c = x.shape
        h, d = host.num_heads, host.head_dim
        v, phi = self._phi_qk(host, x)
        q, k = phi.unflatten(-1, (h, d)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        out = linear_attend(q, k, v.unflatten(-1, (h, d)).transpose(1, 2)).transpose(1, 2).reshape(b, n, c)
        dw = self._dwc_tokens(host, v, grid, num_prefix)
        if num_prefix:
            dw = F.pad(dw, (0, 0, num_prefix, 0))  # class tokens take no DWC term
        return out + dw

    def _check_tokens(self, host, n: int) -> None:
        if host.pos_enc is not None and host.pos_enc.shape[1] != n:
            raise ValueError(f"FocusedLinearAttention was built for {host.pos_enc.shape[1]} tokens, got {n}")

    def _dwc_tokens(self, host, v: torch.Tensor, grid, num_prefix: int) -> torch.Tensor:
        """The DWC term of the non-prefix tokens, ``(B, N - num_prefix, C)``, from ``v`` as ``(B, N, C)``
        tokens: one depthwise conv on the channels-last token map, the per-head weights tiled over
        the heads (the per-head layout is :meth:`value_term`)."""
        b, n, c = v.shape
        h = host.num_heads
        vmap = v[:, num_prefix:].unflatten(1, _grid(n - num_prefix, grid)).permute(0, 3, 1, 2)
        w = host.dwc.weight.repeat(h, 1, 1, 1)
        bias = host.dwc.bias.repeat(h) if host.dwc.bias is not None else None
        return F.conv2d(vmap, w, bias, padding=host.dwc.padding, groups=c).permute(0, 2, 3, 1).reshape(b, -1, c)

