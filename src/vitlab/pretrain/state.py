"""The state of a pretraining run and its checkpoints.

A checkpoint (``checkpoints/last.pt``, written atomically by ``vitlab.engine.checkpoint``) holds:

* ``model``: the encoder's state dict, without a classifier: what ``vitlab train --pretrained PATH``
  loads (a new head is initialised) and what :func:`vitlab.interop.checkpoint.read_state_dict` reads;
  for DINO the teacher's backbone, as the reference evaluates;
* ``method_state`` (encoder + decoder / head / teacher / centre), ``optimizer``, ``scheduler``, every
  rank's RNG states and the position (``epoch``, ``step`` within it, the epoch's running sums): what
  an exact resume needs;
* ``pretrain_config``, ``method``, ``model_name``, ``model_kwargs``, ``img_size``, ``in_chans``,
  ``data`` (mean / std) and ``finetune`` (the ``vitlab train`` command that fine-tunes it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from vitlab.engine.checkpoint import atomic_save, capture_rng, restore_rng
from vitlab.engine.distributed import DistInfo, all_gather_objects
from vitlab.errors import UserError
from vitlab.pretrain.config import PretrainConfig

__all__ = ["PretrainRun", "save_checkpoint", "restore", "check_compatible", "finetune_command"]


@dataclass
class PretrainRun:
    cfg: PretrainConfig
    info: DistInfo
    method: nn.Module
    model_kwargs: Dict[str, Any]
    settings: Dict[str, Any]
    run_dir: str
    optimizer: Any = None
    scheduler: Any = None
    loader: Any = None
    steps_per_epoch: int = 0
    train_model: nn.Module = None  # the method, DDP-wrapped under torchrun
    history: List[Dict[str, Any]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. the k-NN accuracy at initialisation
    global_step: int = 0
    start_epoch: int = 0
    start_step: int = 0
    epoch_accum: Optional[Dict[str, float]] = None
    resumed: Optional[Dict[str, Any]] = None
    last_good: Optional[str] = None
    train_set: Any = None
    val_set: Any = None
    log: Callable[[str], None] = print

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


def finetune_command(run: PretrainRun, path: str) -> str:
    import json

    kw = {k: v for k, v in run.model_kwargs.items() if k != "dynamic_img_size"}
    return (f"vitlab train --pretrained {path} --model {run.cfg.model} --model-kwargs '{json.dumps(kw)}' "
            f"--data {run.cfg.data}")


def save_checkpoint(run: PretrainRun, name: str, epoch: int, step: int, accum: Optional[Dict[str, float]]) -> str:
    """All ranks call this (RNG states are gathered); rank 0 writes ``checkpoints/name``."""
    rngs = all_gather_objects(capture_rng(), run.info)
    path = os.path.join(run.ckpt_dir, name)
    s = run.settings
    if run.info.is_main:
        atomic_save({
            "model": run.method.encoder.state_dict(), "method_state": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rngs,
            "epoch": epoch, "step": step, "epoch_accum": accum, "history": run.history, "extra": run.extra,
            "pretrain_config": run.cfg.to_dict(), "method": run.cfg.method, "model_name": run.cfg.model,
            "model_kwargs": dict(run.model_kwargs), "img_size": s["img_size"], "in_chans": s["in_chans"],
            "data": dict(mean=list(s["mean"]), std=list(s["std"])), "finetune": finetune_command(run, path),
            "vitlab_pretrain": 1,
        }, path)
    return path


def check_compatible(ckpt: Dict[str, Any], cfg: PretrainConfig, path: str) -> None:
    """A resumed checkpoint must be a pretraining checkpoint of the same method and model."""
    if not ckpt.get("vitlab_pretrain"):
        raise UserError(f"--resume {path}: not a vitlab pretrain checkpoint (a vitlab train checkpoint cannot be "
                        f"resumed by vitlab pretrain)")
    for key, value, flag in (("method", cfg.method, "--method"), ("model_name", cfg.model, "--model")):
        if ckpt.get(key) != value:
            raise UserError(f"--resume {path}: the checkpoint was written by {key.split('_')[0]} {ckpt.get(key)!r}, "
                            f"not {flag} {value!r}")
    stored = (ckpt.get("pretrain_config") or {}).get("model_kwargs")
    if stored is not None and stored != cfg.model_kwargs:
        raise UserError(f"--resume {path}: the checkpoint's model arguments {stored} differ from --model-kwargs "
                        f"{cfg.model_kwargs}")


def restore(run: PretrainRun, ckpt: Dict[str, Any], path: str) -> None:
    """Put a resumed run back where its checkpoint left it (weights, optimizer, RNGs, position)."""
    try:
        run.method.load_state_dict(ckpt["method_state"])
    except RuntimeError as exc:
        raise UserError(f"--resume {path}: does not fit this run ({str(exc).splitlines()[-1].strip()})") from None
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.start_epoch, run.start_step = int(ckpt["epoch"]), int(ckpt["step"])
    run.global_step = run.start_epoch * run.steps_per_epoch + run.start_step
    run.history = list(ckpt.get("history", []))
    run.extra = dict(ckpt.get("extra") or {})
    run.epoch_accum = ckpt.get("epoch_accum")
    restore_rng(ckpt["rng"][run.info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    run.resumed = {"path": path, "epoch": run.start_epoch, "step": run.start_step}
    run.last_good = path


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (list, tuple)):
        return [b.to(device, non_blocking=True) for b in batch]
    return batch.to(device, non_blocking=True)
