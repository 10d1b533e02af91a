"""The step loop, in the spirit of nanoGPT's ``train.py``: one epoch of optimizer steps, each
``accum_steps`` micro-batches under autocast, then clipping, the optimizer and schedule step
and the EMA update; plus whole-loader prediction for evaluation."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from vitlab.engine.amp import autocast
from vitlab.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum
from vitlab.engine.progress import Progress
from vitlab.engine.state import Run, save_checkpoint

__all__ = ["predict", "train_epoch", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, info: Optional[DistInfo] = None,
            amp: str = "none", channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels of a whole (possibly rank-sharded) loader, gathered
    from every rank in data-set order."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(amp, device):
            logits = model(x)
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(y)
    p = torch.cat(probs) if probs else torch.zeros(0, 0)
    t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if info is not None and info.enabled:
        shards = all_gather_objects((p, t), info)
        n = sum(s[1].numel() for s in shards)
        p_all = torch.zeros(n, max(s[0].shape[1] for s in shards))
        t_all = torch.zeros(n, dtype=torch.long)
        for r, (ps, ts) in enumerate(shards):  # rank r holds samples r, r + w, ...
            p_all[r::info.world_size], t_all[r::info.world_size] = ps, ts
        p, t = p_all, t_all
    return p, t


def _micro_step(run: Run, x: torch.Tensor, y: torch.Tensor, last: bool, acc: Dict[str, float]) -> torch.Tensor:
    """Forward and backward of one micro-batch (DDP syncs gradients on the last one only)."""
    cfg, p, device = run.cfg, run.parts, run.info.device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = y
    if p.mixup is not None:
        x, target = p.mixup(x, y)
    sync = contextlib.nullcontext() if (last or run.ddp is None) else run.ddp.no_sync()
    with sync:
        with autocast(run.amp, device):
            logits = run.train_model(x)
            if p.distill is not None:  # DeiT distillation: the teacher on the same batch
                loss, logits = p.distill(x, logits, target)
            else:
                loss = p.criterion(logits.float(), target)
        p.scaler.scale(loss / cfg.accum_steps).backward()
    if p.mixup is None:
        acc["correct"] += float((logits.detach().argmax(-1) == y).sum())
    acc["n"] += len(y)
    return loss.detach().double().cpu() * len(y)


def _check_finite(run: Run, step_loss: torch.Tensor, epoch: int, step: int) -> None:
    """Every rank's loss, all-reduced, so that all ranks stop together."""
    flag = torch.tensor([float(not torch.isfinite(step_loss))], dtype=torch.float64)
    if float(all_reduce_sum(flag, run.info)) > 0:
        where = (f"step {run.global_step + 1} (epoch {epoch + 1}, batch {step + 1} of "
                 f"{run.data.steps_per_epoch})")
        keep = f"last good checkpoint: {run.last_good}" if run.last_good else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite loss ({float(step_loss):.4g}) at {where}; stopped, {keep}")


def _optimizer_step(run: Run) -> None:
    cfg, p = run.cfg, run.parts
    if cfg.clip_grad:
        p.scaler.unscale_(p.optimizer)
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.clip_grad)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1
    p.scheduler.step_update(run.global_step)
    if p.ema is not None:
        p.ema.update(p.model, step=run.global_step)


def train_epoch(run: Run, epoch: int, step_log) -> Dict[str, Any]:
    """Optimizer steps of one epoch from its resume position; returns the running sums ``acc``
    (loss, correct, n), ``images`` seen, ``seconds`` taken, whether ``--max-steps`` ``stopped`` it
    and whether that was ``mid_epoch``."""
    cfg, p, spe = run.cfg, run.parts, run.data.steps_per_epoch
    step0 = run.start_step if epoch == run.start_epoch else 0
    run.data.train_loader.sampler.set_position(epoch, step0 * cfg.accum_steps * cfg.batch_size)
    resumed = epoch == run.start_epoch and run.epoch_accum
    acc = dict(run.epoch_accum) if resumed else dict(loss=0.0, correct=0.0, n=0.0)
    run.train_model.train()
    bar = Progress(run.info.is_main and cfg.progress, spe, step0, f"epoch {epoch + 1}/{cfg.epochs + cfg.cooldown_epochs}",
                   cfg.log_interval)
    t0, n0, it, stopped, mid = time.time(), acc["n"], iter(run.data.train_loader), False, False
    for step in range(step0, spe):
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.accum_steps):
            x, y = next(it)
            step_loss += _micro_step(run, x, y, micro == cfg.accum_steps - 1, acc)
        _check_finite(run, step_loss, epoch, step)
        _optimizer_step(run)
        acc["loss"] += float(step_loss)
        loss = float(step_loss) / max(1, cfg.batch_size * cfg.accum_steps)
        lr = p.optimizer.param_groups[-1]["lr"]
        bar.update(loss, lr)
        if run.info.is_main:
            step_log.step(run.global_step, epoch, loss, lr, cfg.batch_size * cfg.accum_steps * run.info.world_size)
        if cfg.ckpt_every_steps and run.global_step % cfg.ckpt_every_steps == 0 and step + 1 < spe:
            run.last_good = save_checkpoint(run, "last.pt", epoch, step + 1, acc)
        if cfg.max_steps and run.global_step >= cfg.max_steps:
            stopped, mid = True, step + 1 < spe
            if mid:  # a resume (with a larger --max-steps) continues this epoch here
                run.last_good = save_checkpoint(run, "last.pt", epoch, step + 1, acc)
            break
    bar.close()
    return dict(acc=acc, images=int(acc["n"] - n0), seconds=time.time() - t0, stopped=stopped, mid_epoch=mid)
