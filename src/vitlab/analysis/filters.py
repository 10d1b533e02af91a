"""Image filters of the common corruptions (``vitlab.analysis.corruptions``), batched in torch:
Gaussian kernels with skimage's conventions, the anti-aliased disk of ImageNet-C's defocus
blur, the motion-blur kernel of the ``imagecorruptions`` package, clipped zoom, plasma fractals
and PIL-style box resizing.  Hendrycks & Dietterich, ICLR 2019; Michaelis et al., 2019."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["_gauss1d", "_filter_matrix", "_separable", "_gaussian_blur_sk", "_disk", "_conv_same", "_shift_indices", "_motion_blur", "_clipped_zoom", "_plasma", "_resize_matrix", "_quantize"]


# -- filters -------------------------------------------------------------------------------------
def _gauss1d(sigma: float, radius: int, dtype) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _filter_matrix(n: int, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """(n, n) matrix applying a 1-D correlation with boundary ``mode``: 'nearest' (edge),
    'reflect' (scipy: d c b a | a b c d) or 'reflect101' (OpenCV default: d c b | a b c d)."""
    r = (len(kernel) - 1) // 2
    m = torch.zeros(n, n, dtype=kernel.dtype)
    for i in range(n):
        for t in range(-r, r + 1):
            j = i + t
            if mode == "nearest":
                j = min(max(j, 0), n - 1)
            else:
                period = 2 * n if mode == "reflect" else 2 * n - 2
                j = j % period if period > 0 else 0
                if j >= n:
                    j = period - j - (1 if mode == "reflect" else 0)
            m[i, j] += kernel[t + r]
    return m


def _separable(x: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor, mode: str) -> torch.Tensor:
    mh = _filter_matrix(x.shape[-2], kh.to(x.dtype), mode).to(x.device)
    mw = _filter_matrix(x.shape[-1], kw.to(x.dtype), mode).to(x.device)
    return mh @ x @ mw.T


def _gaussian_blur_sk(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage.filters.gaussian (mode 'nearest', truncate 4)."""
    if sigma <= 0:
        return x
    k = _gauss1d(sigma, int(4.0 * sigma + 0.5), torch.float64)
    return _separable(x, k, k, "nearest")


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The reference anti-aliased disk kernel (disk then 3x3/5x5 Gaussian, OpenCV reflect-101)."""
    if radius <= 8:
        r, ksize = 8, 3
    else:
        r, ksize = int(radius), 5
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    d = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    d /= d.sum()
    g = _gauss1d(alias_blur, ksize // 2, torch.float64)
    return _separable(d, g, g, "reflect101").float()


def _conv_same(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Per-channel 2-D correlation with a (k, k) kernel, 'reflect' = OpenCV reflect-101."""
    b, c, h, w = x.shape
    k = kernel.shape[-1] // 2
    pad_mode = "reflect" if k < min(h, w) else "replicate"
    xp = F.pad(x.reshape(b * c, 1, h, w), (k, k, k, k), mode=pad_mode)
    return F.conv2d(xp, kernel.to(x)[None, None]).reshape(b, c, h, w)


def _shift_indices(n: int, d: int, device) -> torch.Tensor:
    return (torch.arange(n, device=device) - d).clamp(0, n - 1)


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """Shifted copies along a line at ``angles`` (degrees, one per image) weighted by a
    one-sided Gaussian (imagecorruptions' re-implementation of ImageMagick's motion blur)."""
    b, c, h, w = x.shape
    width = 2 * radius + 1
    k = torch.exp(-torch.arange(width, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).tolist()
    out = torch.zeros_like(x)
    rad = torch.deg2rad(angles.double())
    py, px = width * torch.sin(rad), width * torch.cos(rad)
    hyp = torch.sqrt(py ** 2 + px ** 2)
    alive = torch.ones(b, dtype=torch.bool)
    for i in range(width):
        dy = -torch.ceil(i * py / hyp - 0.5).long()
        dx = -torch.ceil(i * px / hyp - 0.5).long()
        alive &= (dy.abs() < h) & (dx.abs() < w)
        for j in range(b):
            if not alive[j]:
                continue
            iy = _shift_indices(h, int(dy[j]), x.device)
            ix = _shift_indices(w, int(dx[j]), x.device)
            out[j] += k[i] * x[j][:, iy][:, :, ix]
    return out


def _clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """Centre crop of side ceil(h/z), zoomed by z with linear interpolation (scipy ``zoom``
    order 1 ⇔ align_corners=True), then centre-trimmed back to (h, w)."""
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / z)), int(math.ceil(w / z))
    th, tw = (h - ch) // 2, (w - cw) // 2
    crop = x[..., th:th + ch, tw:tw + cw]
    oh, ow = int(round(ch * z)), int(round(cw * z))
    y = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    sh, sw = (oh - h) // 2, (ow - w) // 2
    return y[..., sh:sh + h, sw:sw + w]


def _plasma(b: int, size: int, decay: float, gen) -> torch.Tensor:
    """Diamond-square fractal (B, size, size) in [0, 1] (the reference ``plasma_fractal``)."""
    m = torch.zeros(b, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(a):
        return a / 4 + wibble * (torch.rand(a.shape, generator=gen, dtype=torch.float64) * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:size:step, 0:size:step]
        sq = corner + corner.roll(-1, dims=1)
        sq = sq + sq.roll(-1, dims=2)
        m[:, half:size:step, half:size:step] = wibbled(sq)
        dr = m[:, half:size:step, half:size:step]
        ul = m[:, 0:size:step, 0:size:step]
        m[:, 0:size:step, half:size:step] = wibbled(dr + dr.roll(1, dims=1) + ul + ul.roll(-1, dims=2))
        m[:, half:size:step, 0:size:step] = wibbled(dr + dr.roll(1, dims=2) + ul + ul.roll(-1, dims=1))
        step //= 2
        wibble /= decay
    m -= m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def _resize_matrix(n_in: int, n_out: int, box: bool) -> torch.Tensor:
    """PIL's BOX (box=True) or NEAREST resampling as an (n_out, n_in) matrix."""
    scale = n_in / n_out
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        if not box or scale <= 1:
            m[i, min(int(center), n_in - 1)] = 1.0
            continue
        support = 0.5 * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            u = (j - center + 0.5) / scale
            if -0.5 < u <= 0.5:
                m[i, j] = 1.0
        m[i] /= m[i].sum()
    return m


def _quantize(x):
    return (x * 255).round().clamp(0, 255) / 255
