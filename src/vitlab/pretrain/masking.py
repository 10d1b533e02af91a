"""Patches and masks shared by the masked-image-modelling methods.

* :func:`patchify` / :func:`unpatchify`: images <-> ``(B, L, p*p*C)`` patch rows in raster order,
  the layout of MAE's ``patchify`` (rows are ``(p, p, C)`` pixel blocks);
* :func:`random_masking`: MAE's per-sample shuffle: keep ``int(L * (1 - ratio))`` tokens chosen by the
  argsort of uniform noise, return the kept indices, the binary mask (1 = removed) and the
  permutation that restores the original order;
* :func:`mask_patch_size` and :func:`simmim_mask`: SimMIM's block mask on a coarse grid (32 px at
  the reference 192 px input), upsampled to the stem's token grid.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from vitlab.errors import UserError

__all__ = ["patchify", "unpatchify", "random_masking", "restore_order", "mask_patch_size", "simmim_mask",
           "check_ratio"]


def check_ratio(ratio: float, flag: str = "--mask-ratio") -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise UserError(f"{flag} {ratio!r}: expected a fraction strictly between 0 and 1 (e.g. 0.75)")
    return float(ratio)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)*(W/p), p*p*C)``, each row a patch as ``(p, p, C)``."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: Tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    h, w = grid
    x = x.reshape(b, h, w, p, p, in_chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, in_chans, h * p, w * p)


def random_masking(batch: int, length: int, ratio: float, device=None,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking.  Returns ``ids_keep (B, K)`` (the kept token indices, in
    shuffled order), ``mask (B, L)`` (0 kept, 1 removed, in the original order) and ``ids_restore
    (B, L)`` (``argsort`` of the shuffle: gathering ``[kept, removed]`` with it restores the order),
    where ``K = int(L * (1 - ratio))``."""
    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :keep], mask, ids_restore


def restore_order(x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, L, C)`` in shuffled order (kept tokens first) -> the original token order."""
    return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mask_patch_size(img_size: int, stride: int, requested: Optional[int] = None) -> int:
    """SimMIM's mask patch for an ``img_size`` input and a stem of ``stride``.  The reference masks
    32-pixel blocks of a 192 (Swin) or 224 (ViT) pixel image, a sixth to a seventh of its side; here:
    the largest multiple of the stride that divides the image and is at most 32 px and at most a sixth
    of the image (32 px at 192 and 224 px with strides 4, 16; 4 px for 28 px digits with stride 4), and
    at least the stride.  ``requested`` (``--mask-patch``) must be a multiple of the stride dividing
    the image."""
    if requested is not None:
        if requested < stride or requested % stride or img_size % requested:
            raise UserError(f"--mask-patch {requested}: expected a multiple of the stem stride {stride} that "
                            f"divides the image size {img_size}")
        return int(requested)
    limit = max(stride, min(32, img_size // 6))
    best = stride
    for m in range(stride, limit + 1, stride):
        if img_size % m == 0:
            best = m
    return best


def simmim_mask(batch: int, img_size: int, mask_patch: int, stride: int, ratio: float, device=None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SimMIM's mask ``(B, img/stride, img/stride)`` (1 = masked): ``ceil(G * G * ratio)`` of the
    ``G = img / mask_patch`` coarse cells, chosen at random per sample, each covering
    ``mask_patch / stride`` tokens a side."""
    g = img_size // mask_patch
    count = int(math.ceil(g * g * ratio))
    noise = torch.rand(batch, g * g, device=device, generator=generator)
    idx = noise.argsort(dim=1)[:, :count]
    cells = torch.zeros(batch, g * g, device=device).scatter_(1, idx, 1.0).reshape(batch, g, g)
    scale = mask_patch // stride
    return cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
