"""Patch n' Pack for data loaders: images at their own sizes, packed into fixed-length token sequences.

"Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution" (Dehghani et al., NeurIPS
2023), sec. 2.3 ("Packing"): a greedy packer (first fit by token count, :func:`~vitlab.models.navit.first_fit`)
puts the patches of several images into each sequence of ``max_len`` tokens; every token carries its image's
slot and its (row, column), from which the model builds the block-diagonal mask and the factorised position
embeddings.  :class:`PackingCollate` is a DataLoader ``collate_fn``; :func:`native_size_transform` keeps each
image's aspect ratio and resolution (no resizing to a common size: only a crop to a multiple of the patch, and a
downscale of images larger than the model's position tables).  The packer itself lives with the model
(:mod:`vitlab.models.navit`), which packs a list of images on its own and may not import ``vitlab.data``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from vitlab.models.navit import PackedBatch, TokenDrop, first_fit, pack_images

__all__ = ["PackingCollate", "PackedBatch", "first_fit", "pack_images", "native_size_transform", "packing_loader",
           "packing_geometry", "packed_transforms", "WithDropSeed"]


class PackingCollate:
    """``collate_fn``: ``[(image (C, H, W), label), ...]`` of any sizes -> ``(PackedBatch, labels)``, images
    packed first fit into sequences of ``max_len`` tokens of ``patch_size`` patches; ``token_drop`` (a rate or
    ``(H, W) -> rate``) drops a random part of each image's tokens before packing (NaViT, sec. 2.2; for
    training only).  ``labels`` follow the input order, as the model's predictions do.  Samples whose image is
    an ``(image, seed)`` pair (:class:`WithDropSeed`) drop tokens with one generator per image, so the drop
    depends on the image's seed only (not on batching, workers or a resume)."""

    def __init__(self, patch_size: int, max_len: int, token_drop: TokenDrop = 0.0, seed: Optional[int] = None):
        if patch_size < 1 or max_len < 1:
            raise ValueError(f"patch_size and max_len must be positive, got {patch_size} and {max_len}")
        self.patch_size, self.max_len, self.token_drop = patch_size, max_len, token_drop
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, samples: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[PackedBatch, torch.Tensor]:
        images, generator = [s[0] for s in samples], self.generator
        if images and isinstance(images[0], tuple):
            generator = [torch.Generator().manual_seed(seed) for _, seed in images]
            images = [img for img, _ in images]
        labels = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
        batch = pack_images(images, self.patch_size, self.max_len, self.token_drop, labels, generator)
        return batch, labels


class WithDropSeed:
    """Transform wrapper: ``img -> (transform(img), seed)``, the seed drawn from torch's RNG after the transform;
    under :class:`~vitlab.data.loader.SeededTransform` it is a function of ``(seed, epoch, image)``."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]):
        self.transform = transform

    def __call__(self, img) -> Tuple[torch.Tensor, int]:
        x = self.transform(img)
        return x, int(torch.randint(0, 2 ** 62, ()))


def _target_size(h: int, w: int, patch: int, scale: Optional[Tuple[float, float]],
                 limit: Optional[Tuple[int, int]], max_tokens: Optional[int]) -> Tuple[int, int]:
    """``(H, W)`` after the optional random resize (side factor ``sqrt(u)``, ``u ~ U(scale)``, aspect kept) and
    the shrink that fits the position tables ``limit`` and ``max_tokens`` patches; ``(h, w)`` if nothing applies."""
    r = 1.0 if scale is None else math.sqrt(scale[0] + (scale[1] - scale[0]) * float(torch.rand(())))
    th, tw = h * r, w * r
    s = 1.0
    if limit is not None:
        s = min(s, limit[0] / th, limit[1] / tw)
    if max_tokens is not None and (int(th) // patch) * (int(tw) // patch) > max_tokens:
        s = min(s, math.sqrt(max_tokens * patch * patch / (th * tw)))
    if r == 1.0 and s >= 1.0:  # an image that fits is never resized
        return h, w
    return max(patch, int(th * s)), max(patch, int(tw * s))


def native_size_transform(patch_size: int, mean: Sequence[float], std: Sequence[float],
                          max_size: Union[None, int, Tuple[int, int]] = None, in_chans: Optional[int] = None,
                          hflip: float = 0.0, scale: Optional[Tuple[float, float]] = None,
                          max_tokens: Optional[int] = None) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised ``(C, H, W)`` tensor at its own aspect ratio and resolution: downscaled (aspect
    kept) only when a side exceeds ``max_size`` (an int or ``(H, W)``) or its patches exceed ``max_tokens``,
    then centre-cropped to multiples of ``patch_size``.  Training augmentation (after NaViT's sec. 2.2,
    "Resolution sampling", simplified): ``scale=(lo, hi)`` first resizes by a random area factor in ``[lo, hi]``,
    ``hflip`` flips with that probability.  ``in_chans`` converts the image to grey (1) or RGB (3) first."""
    from torchvision.transforms.v2 import functional as F

    from vitlab.data.transforms import ToMode

    if scale is not None and not 0.0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be an area-factor range (lo, hi) with 0 < lo <= hi, got {scale}")
    limit = None if max_size is None else (max_size, max_size) if isinstance(max_size, int) else tuple(max_size)
    to_mode = ToMode(in_chans) if in_chans else None

    def transform(img) -> torch.Tensor:
        x = F.to_dtype(F.to_image(img if to_mode is None else to_mode(img)), torch.float32, scale=True)
        h, w = x.shape[-2:]
        size = _target_size(h, w, patch_size, scale, limit, max_tokens)
        if size != (h, w):
            x = F.resize(x, list(size), antialias=True)
            h, w = size
        if h < patch_size or w < patch_size:
            raise ValueError(f"a {h}x{w} image is smaller than one {patch_size}x{patch_size} patch")
        x = F.center_crop(x, [h - h % patch_size, w - w % patch_size])
        if hflip > 0 and float(torch.rand(())) < hflip:
            x = F.horizontal_flip(x)
        return F.normalize(x, list(mean), list(std))

    return transform


def packing_geometry(model: Any) -> Optional[Dict[str, Any]]:
    """What the loaders need from a model with the ``packs`` capability (NaViT): ``patch_size``, ``max_len``
    (tokens per sequence), ``max_img_size`` ``[H, W]`` (its position tables) and the training ``token_drop``;
    None for other models."""
    if not getattr(model, "packs", False):
        return None
    return dict(patch_size=int(model.patch_size), max_len=int(model.max_len),
                max_img_size=[int(s) for s in model.max_img_size], token_drop=getattr(model, "token_drop", 0.0))


def packed_transforms(geometry: Dict[str, Any], mean: Sequence[float], std: Sequence[float], in_chans: int,
                      hflip: float = 0.0, scale: Optional[Tuple[float, float]] = None, token_drop: float = 0.0):
    """``(train transform, eval transform, train collate, eval collate)`` for packed training at native sizes:
    the same limits for both transforms (the eval one never augments); ``token_drop`` (NaViT, sec. 2.2) in
    training only, each image's drop seeded with its augmentation (:class:`WithDropSeed`)."""
    p, n, limit = geometry["patch_size"], geometry["max_len"], tuple(geometry["max_img_size"])
    train = native_size_transform(p, mean, std, limit, in_chans, hflip, scale, max_tokens=n)
    if token_drop:
        train = WithDropSeed(train)
    return (train, native_size_transform(p, mean, std, limit, in_chans, max_tokens=n),
            PackingCollate(p, n, token_drop), PackingCollate(p, n))


def packing_loader(dataset: Dataset, collate: PackingCollate, batch_size: int, shuffle: bool = False,
                   workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader of ``(PackedBatch, labels)`` over ``dataset`` (``(image tensor, label)`` items, e.g. an
    ImageFolder with :func:`native_size_transform`): ``batch_size`` images per batch, packed by ``collate``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))
