"""The 15 common corruptions of ImageNet-C / CIFAR-10-C, in torch, batched.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019).  Severity parameters are the reference tables: the CIFAR-10-C
table (``make_cifar_c.py``) for images whose shorter side is below 100 pixels, the ImageNet-C
table otherwise; size-dependent parameters (elastic, and the ImageNet blur sizes for
non-224 inputs) scale with the image side.  Motion blur follows the re-implementation of the
``imagecorruptions`` package (Michaelis et al., "Benchmarking Robustness in Object Detection",
2019), since the original used ImageMagick.  ``frost`` blends the reference frost photographs
when the ``imagecorruptions`` package (which ships them) is installed, else a procedural ice
texture (an approximation, flagged by :data:`FROST_SOURCE`).

``corrupt(images, name, severity)``: images (B, 3, H, W) float in [0, 1]; severity 1..5
(0 returns the input); the output has the input's shape, dtype and range.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from vitlab.analysis.filters import (_clipped_zoom, _conv_same, _disk, _gauss1d, _gaussian_blur_sk,  # noqa: F401
                                     _motion_blur, _plasma, _quantize, _resize_matrix, _separable)

__all__ = ["CORRUPTIONS", "corrupt", "params_for", "FROST_SOURCE"]

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")

_CIFAR = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [.05, .1, .15, .2, .3],
    "contrast": [.75, .5, .4, .3, 0.15],
    # fractions of the image side: (alpha, sigma, affine jitter)
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
_IMAGENET = {
    "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [.03, .06, .09, 0.17, 0.27],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)],
    "brightness": [.1, .2, .3, .4, .5],
    "contrast": [0.4, .3, .2, .1, .05],
    # (alpha, sigma, affine jitter) as multiples of 244/224 × the image side (reference: 244·…)
    "elastic_transform": [(2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02)],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "jpeg_compression": [25, 18, 15, 10, 7],
}


def params_for(name: str, severity: int, size: int):
    """The reference parameter of ``name`` at ``severity`` for images of side ``size``
    (CIFAR-10-C table below 100 pixels, ImageNet-C table otherwise)."""
    table = _CIFAR if size < 100 else _IMAGENET
    return table[name][severity - 1]


# -- corruptions ---------------------------------------------------------------------------------
def gaussian_noise(x, c, gen):
    return (x + c * torch.randn(x.shape, generator=gen).to(x)).clamp(0, 1)


def shot_noise(x, c, gen):
    return (torch.poisson(x.double().cpu() * c, generator=gen) / c).to(x).clamp(0, 1)


def impulse_noise(x, c, gen):
    """skimage ``random_noise(mode='s&p', amount=c)``: a fraction c of all values set to 0 or 1."""
    hit = torch.rand(x.shape, generator=gen).to(x.device) < c
    salt = (torch.rand(x.shape, generator=gen).to(x.device) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def defocus_blur(x, c, gen):
    return _conv_same(x, _disk(c[0], c[1])).clamp(0, 1)


def glass_blur(x, c, gen):
    """Blur, "locally shuffle" pixels, blur again.  As in the reference code (make_imagenet_c.py,
    make_cifar_c.py, imagecorruptions), whose tuple "swap" of numpy views copies the displaced
    pixel onto the current one and leaves the displaced pixel as it was: pixels are duplicated,
    not exchanged; the published data sets were made that way."""
    sigma, delta, iters = c
    x = (_gaussian_blur_sk(x.double(), sigma) * 255).floor().clamp(0, 255) / 255  # np.uint8 truncation
    b, ch, h, w = x.shape
    flat = x.reshape(b, ch, h * w).clone()
    ar = torch.arange(b)
    for _ in range(iters):
        for hh in range(h - delta, delta, -1):
            for ww in range(w - delta, delta, -1):
                d = torch.randint(-delta, delta, (b, 2), generator=gen)
                i0 = hh * w + ww
                i1 = (hh + d[:, 1]) * w + (ww + d[:, 0])
                flat[ar, :, i0] = flat[ar, :, i1]
    return _gaussian_blur_sk(flat.reshape(b, ch, h, w), sigma).clamp(0, 1)


def motion_blur(x, c, gen):
    angles = torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * 90 - 45
    return _motion_blur(x, int(c[0]), c[1], angles).clamp(0, 1)


def zoom_blur(x, c, gen):
    start, stop, step = c
    factors = torch.arange(start, stop, step, dtype=torch.float64).tolist()
    out = x.clone()
    for z in factors:
        out += _clipped_zoom(x, z)
    return (out / (len(factors) + 1)).clamp(0, 1)


def snow(x, c, gen):
    b, _, h, w = x.shape
    layer = c[0] + c[1] * torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)
    layer = _clipped_zoom(layer, c[2])
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer).clamp(0, 1)
    angles = torch.rand(b, generator=gen, dtype=torch.float64) * 90 - 135
    layer = _quantize(_motion_blur(layer, int(c[4]), c[5], angles)).to(x)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, gray * 1.5 + 0.5)
    return (x + layer + layer.flip(-1, -2)).clamp(0, 1)


_FROST_CACHE: Dict[str, list] = {}
FROST_SOURCE = "unloaded"


def _frost_textures():
    global FROST_SOURCE
    if "t" in _FROST_CACHE:
        return _FROST_CACHE["t"]
    texs = []
    try:
        import importlib.util
        import os

        import numpy as np
        from PIL import Image
        spec = importlib.util.find_spec("imagecorruptions")  # locate only: importing it needs OpenCV
        base = os.path.join(list(spec.submodule_search_locations)[0], "frost")
        for name in ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]:
            with Image.open(os.path.join(base, name)) as im:
                img = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            texs.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        FROST_SOURCE = "imagecorruptions frost photographs"
    except Exception:  # package absent: procedural ice texture (approximation)
        g = torch.Generator().manual_seed(1234)
        for _ in range(5):
            p = _plasma(1, 512, 1.2, g)[0].float()
            crystals = (torch.rand(512, 512, generator=g) > 0.997).float()
            crystals = _conv_same(crystals[None, None], _disk(3, 1.0))[0, 0] * 20
            t = (0.6 * p + crystals).clamp(0, 1)
            texs.append(torch.stack([t * 0.85, t * 0.92, t]))
        FROST_SOURCE = "procedural (install imagecorruptions for the reference textures)"
    _FROST_CACHE["t"] = texs
    return texs


def _frost_texture(idx: int, h: int, w: int) -> torch.Tensor:
    """Texture ``idx`` sized for an h x w image.  CIFAR-10-C (make_cifar_c.py): scaled by 0.2.
    ImageNet-C / imagecorruptions: scaled by 1.1 x the factor that makes it cover the image
    (1 if it does), to ``ceil(side * s)`` with cv2's bicubic on 8-bit pixels (rounded)."""
    t = _frost_textures()[idx]
    if h < 100:
        return F.interpolate(t[None], scale_factor=0.2, mode="bicubic", align_corners=False)[0]
    s = max(h / t.shape[1], w / t.shape[2], 1.0) * 1.1
    size = (math.ceil(t.shape[1] * s), math.ceil(t.shape[2] * s))
    return _quantize(F.interpolate(t[None].double(), size=size, mode="bicubic", align_corners=False)[0])


def frost(x, c, gen):
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    for j, idx in enumerate(torch.randint(0, 5, (b,), generator=gen).tolist()):
        t = _frost_texture(idx, h, w)
        # the reference's crop origin: np.random.randint(0, side - h), upper bound excluded
        y0 = int(torch.randint(0, max(t.shape[1] - h, 1), (1,), generator=gen))
        x0 = int(torch.randint(0, max(t.shape[2] - w, 1), (1,), generator=gen))
        out[j] = c[0] * x[j] + c[1] * t[:, y0:y0 + h, x0:x0 + w].to(x)
    return out.clamp(0, 1)


def fog(x, c, gen):
    b, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()
    p = _plasma(b, size, c[1], gen)[:, None, :h, :w].to(x)
    mx = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + c[0] * p) * mx / (mx + c[0])).clamp(0, 1)


def brightness(x, c, gen):
    """HSV value + c (clipped), back to RGB: for fixed hue and saturation RGB scales with V."""
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    scaled = x * (v2 / v.clamp_min(1e-12))
    return torch.where(v > 0, scaled, v2.expand_as(x)).clamp(0, 1)


def contrast(x, c, gen):
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


def _affine_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    a = torch.cat([src, torch.ones(3, 1, dtype=src.dtype)], 1)  # (3, 3)
    return torch.linalg.solve(a, dst).T  # (2, 3): dst = M @ [x, y, 1]


def _sample(img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, half_sample: bool = False) -> torch.Tensor:
    """Bilinear sampling at pixel coordinates, reflected at the border: about the edge pixels'
    centres (cv2 ``BORDER_REFLECT_101``, the reference's affine warp) or, with ``half_sample``,
    about the image edge (scipy ``map_coordinates(mode='reflect')``, its elastic step)."""
    h, w = img.shape[-2:]
    if half_sample:
        grid = torch.stack([(xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1], dim=-1).to(img.dtype)
    else:
        grid = torch.stack([xs / (w - 1) * 2 - 1, ys / (h - 1) * 2 - 1], dim=-1).to(img.dtype)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=not half_sample)


def elastic_transform(x, c, gen):
    b, ch, h, w = x.shape
    scale = min(h, w) if h < 100 else min(h, w) * 244 / 224
    alpha, sigma, jitter = (v * scale for v in c)
    out = torch.empty_like(x)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    center = torch.tensor([w // 2, h // 2], dtype=torch.float64)
    sq = min(h, w) // 3
    pts1 = torch.stack([center + sq, torch.stack([center[0] + sq, center[1] - sq]), center - sq])
    for j in range(b):
        pts2 = pts1 + (torch.rand(3, 2, generator=gen, dtype=torch.float64) * 2 - 1) * jitter
        m = _affine_from_points(pts1, pts2)
        inv = torch.linalg.inv(torch.cat([m, torch.tensor([[0, 0, 1.0]], dtype=torch.float64)]))[:2]
        sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
        sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
        img = _sample(x[j:j + 1], sy[None], sx[None])
        if alpha > 0 and sigma > 0:
            k = _gauss1d(sigma, int(3 * sigma + 0.5), torch.float64)
            field = torch.rand(2, h, w, generator=gen, dtype=torch.float64) * 2 - 1
            dx, dy = _separable(field, k, k, "reflect") * alpha
            img = _sample(img, (yy + dy)[None], (xx + dx)[None], half_sample=True)
        out[j] = img[0]
    return out.clamp(0, 1)


def pixelate(x, c, gen):
    h, w = x.shape[-2:]
    sh, sw = int(h * c), int(w * c)
    down_h, down_w = _resize_matrix(h, sh, True).to(x), _resize_matrix(w, sw, True).to(x)
    small = _quantize(down_h @ x @ down_w.T)  # PIL works on 8-bit images
    up_h, up_w = _resize_matrix(sh, h, True).to(x), _resize_matrix(sw, w, True).to(x)
    return up_h @ small @ up_w.T


def jpeg_compression(x, c, gen):
    from torchvision.io import decode_jpeg, encode_jpeg
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    enc = encode_jpeg(list(u8), quality=int(c))
    dec = decode_jpeg(enc)
    return (torch.stack(dec).to(x.device).to(x.dtype) / 255)


_FUNCS: Dict[str, Callable] = {n: globals()[n] for n in CORRUPTIONS}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: Optional[int] = None,
            generator: Optional[torch.Generator] = None, params=None) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5; 0 = clean) to ``images`` (B, 3, H, W),
    floats in [0, 1].  ``params`` overrides the table entry (e.g. the identity parameter).
    Random corruptions draw from ``generator`` (or a fresh one seeded with ``seed``)."""
    if name not in _FUNCS:
        import difflib
        close = difflib.get_close_matches(str(name), CORRUPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown corruption {name!r}{hint}; valid: {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or isinstance(severity, bool) or not 0 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 0..5 (0 = clean), got {severity!r}")
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
        raise ValueError(f"images must lie in [0, 1] (un-normalised), got range "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    if severity == 0 and params is None:
        return images.clone()
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    c = params if params is not None else params_for(name, severity, min(images.shape[-2:]))
    with torch.no_grad():
        out = _FUNCS[name](images, c, generator)
    return out.to(images.dtype).clamp(0, 1)
