"""``pretrain(cfg)``: one pretraining run, from a :class:`PretrainConfig` to its run directory.

It reuses the engine of ``vitlab train``: data settings and resumable loaders (``EpochSampler``,
per-sample seeded augmentation), the AdamW optimiser and per-step cosine schedule
(``vitlab.engine.optim``), atomic checkpoints with every rank's RNG state, progress lines,
``steps.jsonl`` / ``metrics.jsonl`` / ``config.yaml`` / ``summary.json``, ``torchrun`` DDP and the
single-process CPU run.  A run stopped by ``--max-steps`` (or killed) continues with ``--resume auto``
exactly where it stopped: same data order, masks and weights as an uninterrupted run.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict

import torch
from torch import nn

from vitlab.engine import rundir
from vitlab.engine.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from vitlab.engine.progress import Progress, StepLog
from vitlab.errors import UserError
from vitlab.runtime import set_threads
from vitlab.pretrain.config import PretrainConfig
from vitlab.engine.checkpoint import load_checkpoint, resume_for_run
from vitlab.pretrain.state import (PretrainRun, check_compatible, finetune_command, restore, save_checkpoint,
                                   to_device)

__all__ = ["pretrain"]


def _settings(cfg: PretrainConfig) -> Dict[str, Any]:
    from vitlab.engine.build import data_settings
    from vitlab.engine.config import TrainConfig

    tcfg = TrainConfig(model=cfg.model, model_kwargs=dict(cfg.model_kwargs), data=cfg.data, img_size=cfg.img_size,
                       pretrained=None)
    return data_settings(tcfg)


def _optimisation(run: PretrainRun) -> None:
    from vitlab.engine.config import TrainConfig
    from vitlab.engine.optim import build_optimizer, build_scheduler

    cfg = run.cfg
    run.optimizer = build_optimizer(run.method, "adamw", cfg.lr, cfg.weight_decay, betas=tuple(cfg.betas))
    sched = TrainConfig(epochs=cfg.epochs, min_lr=cfg.min_lr, warmup_lr=1e-6, warmup_epochs=cfg.warmup_epochs)
    run.scheduler = build_scheduler(run.optimizer, sched, run.steps_per_epoch)


def _prepare(cfg: PretrainConfig, info: DistInfo, log) -> PretrainRun:
    """Data, method, optimiser; restore from ``--resume``; DDP; config.yaml."""
    import random

    import numpy as np

    from vitlab.data import build_dataset_pair, build_train_loader
    from vitlab.pretrain.methods import build_method, build_transform

    run_dir = cfg.out or rundir.default_run_dir(f"{cfg.method}-{cfg.model}", info)
    resume = resume_for_run(cfg.resume, run_dir, info.is_main, log)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        check_compatible(ckpt, cfg, resume)
    settings = _settings(cfg)
    train_set, val_set, classes = build_dataset_pair(cfg.data, cfg.data_dir, cfg.download, False)
    steps = len(train_set) // info.world_size // cfg.batch_size
    if steps < 1:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(train_set) // info.world_size} training "
                        f"images per rank")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    method, kw = build_method(cfg, settings, steps)
    method = method.to(info.device)
    tf = build_transform(cfg, settings, getattr(method, "local_size", 0))
    loader = build_train_loader(train_set, tf, cfg.batch_size, cfg.seed, info.world_size, info.rank, cfg.workers,
                                pin_memory=info.device.type == "cuda", drop_last=True)
    run = PretrainRun(cfg, info, method, kw, dict(settings, classes=list(classes)[:1000]), run_dir, loader=loader,
                      steps_per_epoch=steps, train_set=train_set, val_set=val_set, log=log)
    _optimisation(run)
    if ckpt is not None:
        restore(run, ckpt, resume)
        if info.is_main:
            log(f"resumed from {resume} (epoch {run.start_epoch}, step {run.start_step} of {steps})")
    run.train_model = method
    if info.enabled:
        run.train_model = nn.parallel.DistributedDataParallel(
            method, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.is_main:
        os.makedirs(run.ckpt_dir, exist_ok=True)
        _write_config(run)
        n = sum(p.numel() for p in method.encoder.parameters())
        log(f"pretrain {cfg.method} on {cfg.model} ({n / 1e6:.2f} M encoder params), {cfg.data}: {len(train_set)} "
            f"images at {settings['img_size']} px, {cfg.epochs} epochs x {steps} steps, batch {cfg.batch_size} x "
            f"{info.world_size}, lr {cfg.lr:.3g}, device {info.device}")
    return run


def _write_config(run: PretrainRun) -> None:
    d = run.cfg.to_dict()
    d["resolved"] = {k: v for k, v in run.settings.items() if k != "classes"}
    d["resolved"].update(encoder_kwargs=dict(run.model_kwargs), steps_per_epoch=run.steps_per_epoch,
                         world_size=run.info.world_size, device=str(run.info.device))
    rundir.write_yaml(os.path.join(run.run_dir, "config.yaml"), d)


def _step(run: PretrainRun, batch, epoch: int) -> float:
    """One optimizer step: forward (the method's loss), backward, the method's gradient rules
    (DINO: per-parameter clipping, last-layer freezing) or global-norm clipping, step, schedule,
    and the method's post-step update (DINO: the teacher's EMA)."""
    x = to_device(batch[0], run.info.device)
    loss = run.train_model(x, epoch)
    if not torch.isfinite(loss.detach()):
        where = f"step {run.global_step + 1} (epoch {epoch + 1})"
        keep = f"last good checkpoint: {run.last_good}" if run.last_good else "no checkpoint was written yet"
        raise UserError(f"non-finite pretraining loss ({float(loss):.4g}) at {where}; stopped, {keep}")
    loss.backward()
    method = run.method
    if hasattr(method, "after_backward"):
        method.after_backward(epoch)
    elif run.cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(method.parameters(), run.cfg.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1
    run.scheduler.step_update(run.global_step)
    if hasattr(method, "after_step"):
        method.after_step(run.global_step - 1)
    return float(loss.detach())


def _epoch(run: PretrainRun, epoch: int, step_log: StepLog) -> Dict[str, Any]:
    cfg, spe = run.cfg, run.steps_per_epoch
    step0 = run.start_step if epoch == run.start_epoch else 0
    run.loader.sampler.set_position(epoch, step0 * cfg.batch_size)
    resumed = epoch == run.start_epoch and run.epoch_accum
    acc = dict(run.epoch_accum) if resumed else dict(loss=0.0, n=0.0, stat=0.0)
    run.train_model.train()
    bar = Progress(run.info.is_main and cfg.progress, spe, step0, f"epoch {epoch + 1}/{cfg.epochs}", cfg.log_interval)
    t0, it, stopped, mid = time.time(), iter(run.loader), False, False
    for step in range(step0, spe):
        loss = _step(run, next(it), epoch)
        stats = run.method.stats() if hasattr(run.method, "stats") else {}
        acc.update(loss=acc["loss"] + loss, n=acc["n"] + 1, stat=acc["stat"] + sum(stats.values()))
        lr = run.optimizer.param_groups[-1]["lr"]
        bar.update(loss, lr)
        if run.info.is_main:
            step_log.step(run.global_step, epoch, loss, lr, cfg.batch_size * run.info.world_size)
        if cfg.ckpt_every_steps and run.global_step % cfg.ckpt_every_steps == 0 and step + 1 < spe:
            run.last_good = save_checkpoint(run, "last.pt", epoch, step + 1, acc)
        if cfg.max_steps and run.global_step >= cfg.max_steps:
            stopped, mid = True, step + 1 < spe
            if mid:
                run.last_good = save_checkpoint(run, "last.pt", epoch, step + 1, acc)
            break
    bar.close()
    return dict(acc=acc, seconds=time.time() - t0, steps=spe - step0, stopped=stopped, mid_epoch=mid)


def _end_epoch(run: PretrainRun, epoch: int, out: Dict[str, Any]) -> None:
    acc = out["acc"]
    tot = all_reduce_sum(torch.tensor([acc["loss"], acc["n"], acc["stat"]], dtype=torch.float64), run.info)
    record = {"epoch": epoch, "step": run.global_step, "train_loss": float(tot[0] / max(tot[1], 1)),
              "lr": float(run.optimizer.param_groups[-1]["lr"]), "epoch_seconds": out["seconds"],
              "images_per_second": out["steps"] * run.cfg.batch_size * run.info.world_size / max(out["seconds"], 1e-9)}
    if run.cfg.method == "dino":
        record["teacher_entropy"] = float(tot[2] / max(tot[1], 1))
    run.history.append(record)
    if run.info.is_main:
        rundir.write_jsonl(os.path.join(run.run_dir, "metrics.jsonl"), run.history)
        run.log(f"epoch {epoch + 1}/{run.cfg.epochs}: loss {record['train_loss']:.4f}"
                + (f", teacher entropy {record['teacher_entropy']:.3f}" if "teacher_entropy" in record else "")
                + f", {record['images_per_second']:.0f} img/s")
    if not out["mid_epoch"]:
        run.last_good = save_checkpoint(run, "last.pt", epoch + 1, 0, None)


def _knn(run: PretrainRun) -> float:
    from vitlab.data import build_eval_loader, build_eval_transform
    from vitlab.pretrain.knn import knn_accuracy

    s = run.settings
    tf = build_eval_transform(s["img_size"], s["in_chans"], s["mean"], s["std"], s["crop_pct"])
    train = build_eval_loader(run.train_set, tf, 256, workers=run.cfg.workers)
    val = build_eval_loader(run.val_set, tf, 256, workers=run.cfg.workers)
    return knn_accuracy(run.method.encoder, train, val, run.info.device, run.cfg.knn_k, run.cfg.knn_t)


def _finish(run: PretrainRun, t_start: float) -> Dict[str, Any]:
    from vitlab.interop.checkpoint import save_model_files

    cfg, s = run.cfg, run.settings
    summary: Dict[str, Any] = {"method": cfg.method, "model": cfg.model, "data": cfg.data, "run_dir": run.run_dir,
                               "epochs": len(run.history), "steps": run.global_step, "resumed_from": run.resumed,
                               "final_loss": run.history[-1]["train_loss"] if run.history else None}
    if run.info.is_main:
        if cfg.eval == "knn":
            summary.update(knn_top1=_knn(run), knn_top1_init=run.extra.get("knn_top1_init"), knn_k=cfg.knn_k)
            run.log(f"k-NN top-1 (k={cfg.knn_k}, T={cfg.knn_t}): {summary['knn_top1']:.2f}% (at initialisation: "
                    f"{summary['knn_top1_init']:.2f}%)" if summary["knn_top1_init"] is not None else
                    f"k-NN top-1: {summary['knn_top1']:.2f}%")
        args = dict(run.model_kwargs, img_size=s["img_size"], in_chans=s["in_chans"], num_classes=0)
        save_model_files(run.method.encoder, run.run_dir, cfg.model, args, s["classes"],
                         dict(mean=list(s["mean"]), std=list(s["std"]), input_size=[s["in_chans"], s["img_size"],
                                                                                     s["img_size"]]))
        summary["finetune"] = finetune_command(run, os.path.join(run.ckpt_dir, "last.pt"))
        summary["wall_seconds"] = time.time() - t_start
        rundir.write_json(os.path.join(run.run_dir, "summary.json"), summary)
    return summary


def pretrain(cfg: PretrainConfig, log=print) -> Dict[str, Any]:
    """Pretrain (or resume) the run ``cfg`` describes; returns the summary dict."""
    t_start = time.time()
    cfg = cfg.resolved()
    info = init_distributed(cfg.device)
    try:
        set_threads(cfg.threads, cfg.workers)
        run = _prepare(cfg, info, log)
        if cfg.eval == "knn" and run.resumed is None and info.is_main:
            run.extra["knn_top1_init"] = _knn(run)
            log(f"k-NN top-1 at initialisation: {run.extra['knn_top1_init']:.2f}%")
        step_log = StepLog(run.run_dir if info.is_main else None, cfg.log_interval, False, run.global_step)
        for epoch in range(run.start_epoch, cfg.epochs):
            out = _epoch(run, epoch, step_log)
            _end_epoch(run, epoch, out)
            if out["stopped"]:
                break
        step_log.close()
        summary = _finish(run, t_start)
        barrier(info)
        return summary
    finally:
        cleanup(info)
