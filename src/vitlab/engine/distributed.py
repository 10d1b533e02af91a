"""Distributed set-up for ``torchrun`` (DDP, "PyTorch Distributed: Experiences on Accelerating
Data Parallel Training", Li et al., VLDB 2020): gloo on CPU, NCCL on GPU."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "resolve_device", "init_distributed",
           "all_reduce_sum", "all_gather_objects", "barrier", "cleanup"]


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and start the
    process group; a plain ``python`` run is world size 1."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local if world > 1 else (torch.device(device).index or 0))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(world, rank, local, dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
