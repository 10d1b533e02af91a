"""Window helpers for local-attention backbones (Swin, CSwin): partition / reverse, the
relative position bias table, the shifted-window attention mask, stripe partition.

From "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al.,
ICCV 2021) and "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
Windows" (Dong et al., CVPR 2022).  Layouts and index conventions follow the official code
(and timm), so relative-position tables trained there load unchanged.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "window_partition", "window_reverse", "relative_position_index", "resize_relative_position_table",
    "REL_POS_RESIZE_METHODS", "shift_window_mask", "stripe_partition", "stripe_reverse",
]


def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, wh * ww, C)``; windows in raster order, batch-major
    (window ``w`` of image ``b`` is row ``b * nW + w``).  ``H, W`` must be multiples of the window."""
    b, h, w, c = x.shape
    wh, ww = window
    if h % wh or w % ww:
        raise ValueError(f"a {h}x{w} map cannot be split into {wh}x{ww} windows (pad it first)")
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, wh * ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def stripe_partition(x: torch.Tensor, stripe: Tuple[int, int]) -> torch.Tensor:
    """CSwin's ``img2windows`` on a ``(B, H, W, C)`` map: ``(B * nS, sh * sw, C)``.  A vertical
    stripe is ``(H, sw)``, a horizontal one ``(sh, W)``; the same layout as :func:`window_partition`."""
    return window_partition(x, stripe)


def stripe_reverse(stripes: torch.Tensor, stripe: Tuple[int, int], h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`stripe_partition`."""
    return window_reverse(stripes, stripe, h, w)


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """``(wh*ww, wh*ww)`` index into a ``((2wh-1)(2ww-1), heads)`` table: the Swin paper's
    relative position ``(dy + wh - 1) * (2ww - 1) + (dx + ww - 1)`` of query i to key j."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


REL_POS_RESIZE_METHODS = ("timm", "bicubic")


def resize_relative_position_table(table: torch.Tensor, new_window: Tuple[int, int],
                                   method: str = "timm") -> torch.Tensor:
    """Resize a ``((2w-1)^2, heads)`` relative position table to ``new_window`` (e.g. a 224 /
    window-7 Swin checkpoint for a 384 / window-12 model, the Swin paper's 384 fine-tuning).

    ``method="timm"`` (default) is timm's ``resize_rel_pos_bias_table``, the geometric-progression
    interpolation that timm's Swin ``checkpoint_filter_fn`` applies (from BEiT, Bao et al., ICLR
    2022); ``"bicubic"`` is the plain bicubic resize of the official Swin code's
    ``load_pretrained``.  Both are timm's implementations, wrapped.
    """
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table, resize_rel_pos_bias_table_simple

    if method not in REL_POS_RESIZE_METHODS:
        raise ValueError(f"unknown relative position table resize method {method!r}; "
                         f"expected one of {REL_POS_RESIZE_METHODS}")
    if table.ndim != 2:
        raise ValueError(f"expected a (positions, heads) relative position table, got shape {tuple(table.shape)}")
    side = int(round(table.shape[0] ** 0.5))
    if side * side != table.shape[0]:
        raise ValueError(f"relative position table of shape {tuple(table.shape)} is not from a square window")
    n_new = (2 * new_window[0] - 1) * (2 * new_window[1] - 1)
    if n_new == table.shape[0]:
        return table
    fn = resize_rel_pos_bias_table if method == "timm" else resize_rel_pos_bias_table_simple
    return fn(table, tuple(new_window), (n_new, table.shape[1]))


def shift_window_mask(hw: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int],
                      device=None, dtype=torch.float32) -> torch.Tensor:
    """The shifted-window attention mask ``(nW, N, N)``: 0 between tokens of the same region of
    the cyclically shifted map, -100 across regions (the official value).  ``hw`` is the padded map."""
    h, w = hw
    img = torch.zeros(1, h, w, 1, device=device, dtype=dtype)
    cnt = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, window).squeeze(-1)  # nW, N
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)
