"""Depthwise separable self-attention as a grouping part: ``separable``.

"SepViT: Separable Vision Transformer" (Li, Wang, Xia, Wu, Li, Xiao, Zheng & Wen, arXiv 2203.15380, 2022),
sec. 3.2.  The map is cut into non-overlapping windows and a learned **window token** joins each window:

1. **depthwise self-attention** (DSA): the host's core attends inside each window over ``1 + ws * ws`` tokens
   (the host's ``qkv`` projection, modifiers and position parts act here, as in any window grouping);
2. **pointwise self-attention** (PSA): each window's output token, through a norm and GELU, gives one query
   and one key per head (``psa.qk``); the core's attention matrix between windows ``(nW x nW)`` per head mixes
   the windows' whole feature maps (the values: each window's ``ws * ws`` tokens of that head).

As the official code (``SeparableAttention``), each step adds its input back (DSA output + the window tokens
and map it read, PSA output + that), then the host's ``proj`` maps the channels.  A map that one window
covers has no window token and no PSA (the official code's last stage).  "Grouped self-attention" (sec.
3.3) is the same part with windows twice as wide (the recipe alternates 7 and 14).

Tensors on the host: ``win_tokens`` ``(nW, 1, C)`` (zeros, as the official code) and the module ``psa``
(``norm``, ``qk``), which records the window-to-window map under ``record_attention`` (the host records the
in-window maps, window token first).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from vitlab.layers.attn_parts import GROUPINGS, require_layout
from vitlab.layers.grouping import _Grouping
from vitlab.layers.layout import TokenLayout
from vitlab.layers.linear import Linear
from vitlab.layers.recording import RecordsAttention
from vitlab.layers.window import window_partition, window_reverse

__all__ = ["SeparableGrouping", "PointwiseAttention"]


class PointwiseAttention(RecordsAttention, nn.Module):
    """SepViT's pointwise step (Li et al., 2022, sec. 3.2): ``softmax(q_w k_w^T)`` between windows, queries
    and keys from ``GELU(norm(window tokens))``, values the windows' maps.  The score is the host's core
    (its ``logits`` and ``normalize``), so a cosine core attends by cosine across windows too."""

    def __init__(self, dim: int, windows_grid: Tuple[int, int], norm: str = "layernorm", norm_eps: float = 1e-5,
                 qkv_bias: bool = True):
        from vitlab.layers.norm import create_norm

        super().__init__()
        self.windows_grid = tuple(windows_grid)
        self.norm = create_norm(norm, dim, eps=norm_eps)
        self.act = nn.GELU()
        self.qk = Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(self, host, tokens: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Window tokens ``(B, nW, C)`` and window maps ``(B, nW, n, C)`` -> ``(B * nW, n, C)``."""
        b, nw, n, c = maps.shape
        h, d = host.num_heads, c // host.num_heads
        q, k = self.qk(self.act(self.norm(tokens))).reshape(b, nw, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        v = maps.reshape(b, nw, n, h, d).permute(0, 3, 1, 2, 4).reshape(b, h, nw, n * d)
        q, k, _ = host.core.prepare(host, q, k, k)  # the core's q/k treatment (cosine: unit vectors)
        probs = host.core.normalize(host, host.core.logits(host, q, k))
        self._record(probs, TokenLayout(self.windows_grid))
        out = (host.attn_drop(probs) @ v).reshape(b, h, nw, n, d).permute(0, 2, 3, 1, 4)
        return (out.reshape(b, nw, n, c) + maps).reshape(b * nw, n, c)  # the official code's shortcut


@GROUPINGS.register("separable")
class SeparableGrouping(_Grouping):
    """Windows of ``window_size`` a side with a learned token each, attended depthwise (inside each window)
    then pointwise (across windows); see the module docstring.  The window shrinks to a smaller map (one
    window: no window token, no pointwise step); otherwise the map must be a multiple of the window (the
    official code does not pad).  ``norm`` / ``norm_eps``: the window tokens' norm before the pointwise
    step (the official code's ``nn.LayerNorm``, eps 1e-5)."""

    takes_prefix = False
    needs_matrix = True  # capability: the pointwise step forms the core's matrix between windows (set per map)

    def __init__(self, window_size: int = 7, norm: str = "layernorm", norm_eps: float = 1e-5):
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size, self.norm, self.norm_eps = window_size, norm, norm_eps

    def setup(self, host) -> None:
        h, w = self.grid = tuple(require_layout(host, self).hw)
        self.window = tuple(min(r, self.window_size) for r in (h, w))
        if h % self.window[0] or w % self.window[1]:
            raise ValueError(f"separable attention needs the {h}x{w} map to be a multiple of its {self.window_size}"
                             f"x{self.window_size} windows (no padding, as the official code); choose a window_size "
                             f"dividing {h} and {w}")
        if host.inner != host.dim:
            raise ValueError(f"separable attention adds each step's input to its output, so heads * head_dim "
                             f"({host.inner}) must equal dim ({host.dim}); drop head_dim")
        self.windows_grid = (h // self.window[0], w // self.window[1])
        self.num_windows = self.windows_grid[0] * self.windows_grid[1]
        self.needs_matrix = self.num_windows > 1
        if self.num_windows > 1:  # one map covered by one window needs no summary token (official code)
            host.win_tokens = nn.Parameter(torch.zeros(self.num_windows, 1, host.dim))
            host.psa = PointwiseAttention(host.dim, self.windows_grid, self.norm, self.norm_eps,
                                          getattr(host.projection, "qkv_bias", True))

    def key_grid(self, layout):
        return self.window, int(self.num_windows > 1)

    def inputs(self, host, x, layout):
        if tuple(layout.grid) != self.grid:
            raise ValueError(f"separable attention was built for a {self.grid} map (one learned token per window), "
                             f"got {tuple(layout.grid)}; build the model for this input size")
        if self.num_windows == 1:
            return x, x, (x.shape[0], x)
        b, n, c = x.shape
        windows = window_partition(x.view(b, *self.grid, c), self.window)  # (B * nW, ws * ws, C), batch-major
        tokens = host.win_tokens.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * self.num_windows, 1, c)
        windows = torch.cat([tokens.to(windows.dtype), windows], dim=1)
        return windows, windows, (b, windows)

    def merge(self, host, outs, layout, state):
        """The depthwise output plus its input; with several windows, then the pointwise step."""
        b, xin = state
        o = outs[0]
        y = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1) + xin  # the official code's shortcut
        if self.num_windows == 1:
            return y
        c = y.shape[-1]
        return host.psa(host, y[:, 0].reshape(b, self.num_windows, c), y[:, 1:].reshape(b, self.num_windows, -1, c))

    def outputs(self, host, y, state):
        if self.num_windows == 1:
            return y
        h, w = self.grid
        return window_reverse(y, self.window, h, w).reshape(state[0], h * w, -1)
