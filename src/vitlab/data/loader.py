"""Samplers and loaders with exact, resumable data order.

Data order and augmentation are functions of ``(seed, epoch, sample)`` only:

* :class:`EpochSampler` wraps torch's ``DistributedSampler`` (or timm's ``RepeatAugSampler``,
  the repeated augmentation of Hoffer et al., "Augment your batch", CVPR 2020, used by DeiT),
  reseeds it every epoch and can start mid-epoch (``set_position``), which is what resuming
  a run killed in the middle of an epoch needs;
* :class:`SeededTransform` draws each sample's augmentation from an RNG seeded by
  ``(seed, epoch, key)``, so the result does not depend on the number of worker processes,
  on the number of DDP ranks, or on where a run was resumed.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["EpochSampler", "SeededTransform", "TransformDataset", "build_train_loader", "build_eval_loader",
           "ShardSampler"]


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """Yields ``(epoch, key, index)`` triples for this rank, starting at ``start``.

    ``key`` identifies the draw for augmentation seeding: the data-set index (so the same
    image gets the same augmentation whatever the world size) or, with repeated
    augmentation, the position in the repeated list (so the repeats differ).
    """

    def __init__(self, dataset_len: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.n, self.world, self.rank, self.seed = dataset_len, world_size, rank, seed
        self.repeats, self.shuffle = repeats, shuffle
        self.epoch, self.start = 0, 0
        sized = range(dataset_len)  # samplers only need len()
        if repeats > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            self.base = RepeatAugSampler(sized, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                         num_repeats=repeats)
        else:
            self.base = DistributedSampler(sized, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                           drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # RepeatAugSampler seeds with the epoch only: fold the run seed in
        self.base.set_epoch(epoch if self.repeats == 1 else _mix(self.seed, epoch) % (2 ** 31))

    def set_position(self, epoch: int, start: int) -> None:
        """Start the next iteration at this rank's ``start``-th sample of ``epoch``."""
        self.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return len(self.base) - self.start

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        indices = list(self.base)
        for pos in range(self.start, len(indices)):
            key = indices[pos] if self.repeats == 1 else self.n * (1 + self.rank) + pos * self.world
            yield (self.epoch, key, indices[pos])
        self.start = 0


class ShardSampler(Sampler):
    """Evaluation order for rank ``r`` of ``w``: indices ``r, r+w, ...`` (no padding, so
    metrics gathered from all ranks count every sample exactly once)."""

    def __init__(self, dataset_len: int, world_size: int = 1, rank: int = 0):
        self.indices = list(range(rank, dataset_len, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class SeededTransform:
    """Apply ``transform`` under RNGs (torch, python ``random``, numpy) seeded from
    ``(seed, epoch, key)``; the caller's RNG states are restored afterwards."""

    def __init__(self, transform, seed: int, numpy_rng: Optional[bool] = None):
        self.transform, self.seed = transform, seed
        if numpy_rng is None:  # only timm's RandAugment draws from numpy; its state is slow to save
            parts = getattr(transform, "transforms", [transform])
            numpy_rng = any(type(t).__module__.startswith("timm.data.auto_augment") for t in parts)
        self.numpy_rng = numpy_rng

    def __call__(self, img, epoch: int, key: int):
        s = _mix(self.seed, epoch, key)
        gen = torch.default_generator  # CPU only: torch.manual_seed would also touch every accelerator
        torch_state, py_state = gen.get_state(), random.getstate()
        np_state = np.random.get_state() if self.numpy_rng else None
        gen.manual_seed(s)
        random.seed(s)
        if np_state is not None:
            np.random.seed(s % (2 ** 32))
        try:
            return self.transform(img)
        finally:
            gen.set_state(torch_state)
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)


class TransformDataset(Dataset):
    """``base[i] -> (transform(image), target)``; indices may be ``(epoch, key, i)`` triples
    from :class:`EpochSampler`, used to seed a :class:`SeededTransform`."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item):
        if isinstance(item, tuple):
            epoch, key, i = item
            img, target = self.base[i]
            return self.transform(img, epoch, key), target
        img, target = self.base[item]
        return self.transform(img), target


def _loader_kwargs(workers: int, pin_memory: bool):
    # a private generator: creating an iterator must not consume the global torch RNG (it
    # would shift dropout / drop-path draws between a resumed and an uninterrupted run)
    kw = dict(num_workers=workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
    if workers > 0:
        kw.update(persistent_workers=False, prefetch_factor=4)
    return kw


def build_train_loader(dataset: Dataset, transform, batch_size: int, seed: int, world_size: int = 1,
                       rank: int = 0, workers: int = 0, repeats: int = 1, pin_memory: bool = False,
                       drop_last: bool = False, collate_fn=None) -> DataLoader:
    """Training loader: ``loader.sampler`` is an :class:`EpochSampler` (call
    ``set_position(epoch, start)`` before iterating an epoch); ``collate_fn`` (e.g. packing) must be
    deterministic, as the order and the transforms are."""
    sampler = EpochSampler(len(dataset), world_size, rank, seed=seed, repeats=repeats)  # type: ignore[arg-type]
    ds = TransformDataset(dataset, SeededTransform(transform, seed))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                      **_loader_kwargs(workers, pin_memory))


def build_eval_loader(dataset: Dataset, transform, batch_size: int, world_size: int = 1, rank: int = 0,
                      workers: int = 0, pin_memory: bool = False, collate_fn=None) -> DataLoader:
    ds = TransformDataset(dataset, transform)
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(dataset), world_size, rank),  # type: ignore
                      shuffle=False, collate_fn=collate_fn, **_loader_kwargs(workers, pin_memory))
