"""The state of a run: what is checkpointed, how it is restored, and which checkpoints are kept.

A checkpoint holds the model, optimizer, scheduler, grad scaler and EMA state dicts, every
rank's RNG states, the position (epoch and optimizer step within it, plus the running sums of
the epoch so far), the metric history, the best metric and the resolved config.  Checkpoints are
written atomically (:func:`vitlab.engine.checkpoint.atomic_save`) and read with
``weights_only=True``.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from vitlab.engine.build import Data, Parts
from vitlab.engine.checkpoint import atomic_save, capture_rng, restore_rng
from vitlab.engine.config import TrainConfig
from vitlab.engine.distributed import DistInfo, all_gather_objects

__all__ = ["Run", "save_checkpoint", "restore", "rank_best", "write_best", "better", "copy_atomic"]

LOWER_IS_BETTER = ("nll", "ece")


def better(metric: str, new: float, old: Optional[float]) -> bool:
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


@dataclass
class Run:
    """Everything the loop and the writers share."""

    cfg: TrainConfig
    info: DistInfo
    amp: str  # resolved: none | bf16 | fp16
    data: Data
    parts: Parts
    run_dir: str
    train_model: nn.Module = None  # DDP- and/or compile-wrapped model used for training steps
    ddp: Any = None
    log: Callable[[str], None] = print
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Optional[float] = None
    best_ckpts: List[Tuple[float, int]] = field(default_factory=list)  # (metric, epoch) of kept best-epochK.pt
    global_step: int = 0
    start_epoch: int = 0
    start_step: int = 0
    epoch_accum: Optional[Dict[str, float]] = None
    last_good: Optional[str] = None
    resume_path: Optional[str] = None
    resumed: Optional[Dict[str, Any]] = None

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


def save_checkpoint(run: Run, name: str, epoch: int, step: int, accum: Optional[Dict[str, float]]) -> str:
    """All ranks call this (RNG states are gathered); rank 0 writes ``checkpoints/name``."""
    rngs = all_gather_objects(capture_rng(), run.info)
    path = os.path.join(run.ckpt_dir, name)
    p, ds = run.parts, run.data.settings
    if run.info.is_main:
        atomic_save({
            "model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict() if p.scaler.is_enabled() else None,
            "ema": p.ema.module.state_dict() if p.ema is not None else None, "rng": rngs,
            "epoch": epoch, "step": step, "history": run.history, "epoch_accum": accum,
            "best_top1": run.best if run.cfg.eval_metric == "top1" else None, "best": run.best,
            "best_ckpts": [list(b) for b in run.best_ckpts], "config": run.cfg.to_dict(),
            "num_classes": p.num_classes, "img_size": ds["img_size"], "in_chans": ds["in_chans"],
            "model_kwargs": ds.get("model_kwargs"), "classes": list(run.data.classes)[:1000],
            "data": dict(mean=ds["mean"], std=ds["std"], crop_pct=ds["crop_pct"], kind=ds["kind"],
                         **({"num_frames": ds["num_frames"]} if "num_frames" in ds else {})), "vitlab_checkpoint": 1,
        }, path)
    return path


def restore(run: Run, ckpt: Dict[str, Any]) -> None:
    """Put a resumed run back where its checkpoint left it (weights, optimizer, RNGs, position)."""
    p = run.parts
    p.model.load_state_dict(ckpt["model"])
    p.optimizer.load_state_dict(ckpt["optimizer"])
    p.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        p.scaler.load_state_dict(ckpt["scaler"])
    if p.ema is not None and ckpt.get("ema") is not None:
        p.ema.module.load_state_dict(ckpt["ema"])
    run.start_epoch, run.start_step = int(ckpt["epoch"]), int(ckpt["step"])
    run.global_step = run.start_epoch * run.data.steps_per_epoch + run.start_step
    run.history = list(ckpt.get("history", []))
    run.epoch_accum = ckpt.get("epoch_accum")
    best = ckpt.get("best", ckpt.get("best_top1"))
    run.best = None if best is None or best == -1.0 else float(best)
    run.best_ckpts = [(float(m), int(e)) for m, e in ckpt.get("best_ckpts", [])]
    restore_rng(ckpt["rng"][run.info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    run.resumed = {"path": run.resume_path, "epoch": run.start_epoch, "step": run.start_step}


def copy_atomic(src: str, dst: str) -> None:
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def rank_best(run: Run, epoch: int, value: float) -> Dict[str, Any]:
    """After an evaluated epoch, on every rank: update the best ``--eval-metric`` and the
    ``--checkpoint-hist`` ranking; returns what :func:`write_best` must do with the checkpoint."""
    metric = run.cfg.eval_metric
    is_best = better(metric, value, run.best)
    if is_best:
        run.best = value
    actions: Dict[str, Any] = {"best": is_best, "keep": False, "drop": []}
    if run.cfg.checkpoint_hist > 1:
        sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
        ranked = sorted(run.best_ckpts + [(value, epoch + 1)], key=lambda t: (sign * t[0], t[1]))
        n = run.cfg.checkpoint_hist
        actions.update(keep=(value, epoch + 1) in ranked[:n], drop=[e for _, e in ranked[n:]])
        run.best_ckpts = ranked[:n]
    return actions


def write_best(run: Run, epoch: int, actions: Dict[str, Any], last_path: str) -> None:
    """Rank 0: ``best.pt`` is the best epoch's checkpoint; ``best-epochK.pt`` the N best."""
    if actions["best"]:
        copy_atomic(last_path, os.path.join(run.ckpt_dir, "best.pt"))
    if actions["keep"]:
        copy_atomic(last_path, os.path.join(run.ckpt_dir, f"best-epoch{epoch + 1}.pt"))
    for e in actions["drop"]:
        path = os.path.join(run.ckpt_dir, f"best-epoch{e}.pt")
        if os.path.exists(path):
            os.remove(path)
