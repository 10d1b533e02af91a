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

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from vitlab.models.navit import PackedBatch, TokenDrop, first_fit, pack_images

__all__ = ["PackingCollate", "PackedBatch", "first_fit", "pack_images", "native_size_transform", "packing_loader"]


class PackingCollate:
    """``collate_fn``: ``[(image (C, H, W), label), ...]`` of any sizes -> ``(PackedBatch, labels)``, images
    packed first fit into sequences of ``max_len`` tokens of ``patch_size`` patches; ``token_drop`` (a rate or
    ``(H, W) -> rate``) drops a random part of each image's tokens before packing (NaViT, sec. 2.2; for
    training only).  ``labels`` follow the input order, as the model's predictions do."""

    def __init__(self, patch_size: int, max_len: int, token_drop: TokenDrop = 0.0, seed: Optional[int] = None):
        if patch_size < 1 or max_len < 1:
            raise ValueError(f"patch_size and max_len must be positive, got {patch_size} and {max_len}")
        self.patch_size, self.max_len, self.token_drop = patch_size, max_len, token_drop
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, samples: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[PackedBatch, torch.Tensor]:
        images = [s[0] for s in samples]
        labels = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
        batch = pack_images(images, self.patch_size, self.max_len, self.token_drop, labels, self.generator)
        return batch, labels


def native_size_transform(patch_size: int, mean: Sequence[float], std: Sequence[float],
                          max_size: Optional[int] = None) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised ``(C, H, W)`` tensor at its own aspect ratio and resolution: downscaled (aspect
    kept) only when a side exceeds ``max_size``, then centre-cropped to multiples of ``patch_size``."""
    from torchvision.transforms.v2 import functional as F

    def transform(img) -> torch.Tensor:
        x = F.to_dtype(F.to_image(img), torch.float32, scale=True)
        h, w = x.shape[-2:]
        if max_size is not None and max(h, w) > max_size:  # larger than the position tables: shrink, keep aspect
            s = max_size / max(h, w)
            x = F.resize(x, [max(patch_size, int(h * s)), max(patch_size, int(w * s))], antialias=True)
            h, w = x.shape[-2:]
        if h < patch_size or w < patch_size:
            raise ValueError(f"a {h}x{w} image is smaller than one {patch_size}x{patch_size} patch")
        x = F.center_crop(x, [h - h % patch_size, w - w % patch_size])
        return F.normalize(x, list(mean), list(std))

    return transform


def packing_loader(dataset: Dataset, collate: PackingCollate, batch_size: int, shuffle: bool = False,
                   workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader of ``(PackedBatch, labels)`` over ``dataset`` (``(image tensor, label)`` items, e.g. an
    ImageFolder with :func:`native_size_transform`): ``batch_size`` images per batch, packed by ``collate``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))
