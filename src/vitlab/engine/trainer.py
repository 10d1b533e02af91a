"""``train(cfg)``: one run, from a :class:`~vitlab.engine.config.TrainConfig` to its run directory.

The pieces live by concern: :mod:`~vitlab.engine.build` (data, model, optimiser, schedule),
:mod:`~vitlab.engine.state` (checkpoints, resume, best checkpoints), :mod:`~vitlab.engine.loop`
(the step loop), :mod:`~vitlab.engine.rundir` (files).  ``train`` reads top to bottom: build,
restore, then per epoch train, evaluate, log and checkpoint; then the final report.

Training recipe ingredients follow DeiT ("Training data-efficient image transformers &
distillation through attention", Touvron et al., ICML 2021): AdamW, cosine schedule with
warmup, label smoothing, Mixup ("mixup: Beyond Empirical Risk Minimization", Zhang et al.,
ICLR 2018), CutMix (Yun et al., ICCV 2019), RandAugment, random erasing, repeated
augmentation, stochastic depth and an EMA of the weights.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import torch
from torch import nn

from vitlab.engine import build, rundir
from vitlab.engine.amp import resolve_amp
from vitlab.engine.build import build_model, data_settings  # noqa: F401  (re-exported)
from vitlab.engine.checkpoint import load_checkpoint, resume_for_run
from vitlab.engine.config import TrainConfig
from vitlab.engine.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from vitlab.engine.loop import TrainingDiverged, predict, train_epoch
from vitlab.engine.progress import StepLog
from vitlab.engine.rundir import plot_curves  # noqa: F401  (re-exported)
from vitlab.engine.state import Run, copy_atomic, rank_best, restore, save_checkpoint, write_best

__all__ = ["train", "evaluate", "build_model", "TrainingDiverged", "predict"]


def evaluate(model: nn.Module, loader, device: torch.device, info: Optional[DistInfo] = None, amp: str = "none",
             channels_last: bool = False, n_bins: int = 15) -> Dict[str, float]:
    """top1/top5 (percent), NLL, ECE (15 bins) and the uncertainty metrics of
    :func:`vitlab.analysis.calibration.calibration_metrics`."""
    from vitlab.engine.metrics import calibration_metrics
    from vitlab.layers.linear import clear_bf16_weights

    p, t = predict(model, loader, device, info, amp, channels_last)
    clear_bf16_weights()  # the bf16 weight copies of this pass (amp bf16) are stale after the next step
    return calibration_metrics(p, t, n_bins=n_bins)


def _setup_threads(cfg: TrainConfig) -> None:
    from vitlab.runtime import set_threads

    set_threads(cfg.threads, cfg.workers)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _prepare(cfg: TrainConfig, info: DistInfo, log) -> Run:
    """Build the run, restore it from ``--resume``, wrap the model for DDP / compile, write config.yaml."""
    run_dir = cfg.out or rundir.default_run_dir(cfg.model, info)
    resume_path = resume_for_run(cfg.resume, run_dir, info.is_main, log)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    data = build.build_data(cfg, info.world_size, info.rank, info.device.type == "cuda")
    # the resolved size and model arguments go into the stored config: eval, analyze and resume
    # rebuild the same model without resolving them again
    cfg.img_size = data.settings["img_size"]
    if data.settings.get("model_kwargs") is not None:
        cfg.model_kwargs = dict(data.settings["model_kwargs"])
    parts = build.build_parts(cfg if ckpt is None else _no_pretrained(cfg), data, info.device, info.world_size)
    amp = resolve_amp(cfg.amp, info.device, parts.model)
    run = Run(cfg, info, amp, data, parts, run_dir, log=log, resume_path=resume_path, last_good=resume_path)
    if ckpt is not None:
        restore(run, ckpt)
        if info.is_main:
            log(f"resumed from {resume_path} (epoch {run.start_epoch}, step {run.start_step} of "
                f"{data.steps_per_epoch})")
    elif parts.pretrained_report and info.is_main:
        log(f"pretrained: {parts.pretrained_report}")
    run.train_model = parts.model
    if info.enabled:
        run.ddp = run.train_model = nn.parallel.DistributedDataParallel(
            parts.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        run.train_model = torch.compile(run.train_model)
    if info.is_main:
        os.makedirs(run.ckpt_dir, exist_ok=True)
        rundir.write_config(run)
        rundir.write_jsonl(os.path.join(run_dir, "metrics.jsonl"), run.history)
        n = sum(p.numel() for p in parts.model.parameters())
        log(f"model {cfg.model} ({n / 1e6:.2f} M params) on {cfg.data}: {len(data.train_set)} train / "
            f"{len(data.val_set)} val images at {_size_text(data.settings)}, {parts.num_classes} classes, "
            f"{cfg.epochs + cfg.cooldown_epochs} epochs x {data.steps_per_epoch} steps, global batch "
            f"{parts.global_batch}, lr {parts.lr:.3g}, amp {run.amp}, world size {info.world_size}, device {info.device}")
    return run


def _size_text(ds: Dict[str, Any]) -> str:
    return "native sizes (packed)" if ds.get("packing") else f"{ds['img_size']} px"


def _no_pretrained(cfg: TrainConfig) -> TrainConfig:
    """A resumed run's weights come from its checkpoint, not from ``--pretrained`` again."""
    return TrainConfig.from_dict(dict(cfg.to_dict(), pretrained=None))


def _validate(run: Run, record: Dict[str, Any]) -> Dict[str, Any]:
    """Evaluate the model (and the EMA) on the validation split; returns the probabilities."""
    from vitlab.engine.metrics import calibration_metrics

    cfg, p, info = run.cfg, run.parts, run.info
    probs = predict(p.model, run.data.val_loader, info.device, info, run.amp, cfg.channels_last)
    metrics = calibration_metrics(*probs, n_bins=15)
    record.update({f"val_{k}": v for k, v in metrics.items()})
    if p.ema is not None:
        ema = evaluate(p.ema.module, run.data.val_loader, info.device, info, run.amp, cfg.channels_last)
        record.update({f"ema_val_{k}": ema[k] for k in ("top1", "top5", "nll", "ece")})
    if cfg.sched == "plateau":
        p.scheduler.step(record["epoch"] + 1, metrics[cfg.eval_metric])
    return dict(metrics=metrics, probs=probs)


def _epoch_record(run: Run, epoch: int, out: Dict[str, Any]) -> Dict[str, Any]:
    """The epoch's training numbers, summed over ranks."""
    acc, info = out["acc"], run.info
    imgs = float(all_reduce_sum(torch.tensor(float(out["images"])), info))
    tot = all_reduce_sum(torch.tensor([acc["loss"], acc["correct"], acc["n"]], dtype=torch.float64), info)
    return {"epoch": epoch, "step": run.global_step, "train_loss": float(tot[0] / max(tot[2], 1)),
            "train_top1": float(100 * tot[1] / max(tot[2], 1)) if run.parts.mixup is None else None,
            "lr": float(run.parts.optimizer.param_groups[-1]["lr"]), "images_per_second": imgs / max(out["seconds"], 1e-9),
            "epoch_seconds": out["seconds"], "_images": imgs}


def _end_epoch(run: Run, epoch: int, out: Dict[str, Any], evaluated: Optional[Dict[str, Any]]) -> None:
    """Log the epoch, checkpoint it (``last.pt``) and keep the best checkpoints."""
    record = out["record"]
    actions = rank_best(run, epoch, record[f"val_{run.cfg.eval_metric}"]) if evaluated else None
    run.history.append({k: v for k, v in record.items() if not k.startswith("_")})
    if run.info.is_main:
        rundir.write_jsonl(os.path.join(run.run_dir, "metrics.jsonl"), run.history)
        run.log(f"epoch {epoch + 1}/{run.cfg.epochs + run.cfg.cooldown_epochs}: train loss {record['train_loss']:.4f}"
                + (f", val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else "")
                + (f", EMA val top-1 {record['ema_val_top1']:.2f}%" if "ema_val_top1" in record else "")
                + f", {record['images_per_second']:.0f} img/s")
    if not out["mid_epoch"]:
        run.last_good = save_checkpoint(run, "last.pt", epoch + 1, 0, None)
    if run.info.is_main and actions is not None:
        write_best(run, epoch, actions, run.last_good)
    if run.info.is_main and run.cfg.keep_epoch_ckpts and not out["mid_epoch"]:
        copy_atomic(run.last_good, os.path.join(run.ckpt_dir, f"epoch{epoch + 1}.pt"))


def _finish(run: Run, evaluated: Optional[Dict[str, Any]], t_start: float, train_stats) -> Dict[str, Any]:
    """The final report: summary.json, curves, reliability diagram and the model files."""
    from vitlab.engine.metrics import plot_reliability_diagram

    if evaluated is None:  # resumed a finished run, or the last epoch was not evaluated: evaluate once
        evaluated = _validate(run, {"epoch": len(run.history)})
    m, (seconds, images) = evaluated["metrics"], train_stats
    summary = {"model": run.cfg.model, "data": run.cfg.data, "run_dir": run.run_dir,
               **{k: m[k] for k in ("top1", "top5", "nll", "ece", "acc90", "unc90", "freq90", "brier")},
               "epochs": len(run.history), "steps": run.global_step, "amp": run.amp,
               "images_per_second": (images / seconds) if seconds else None,
               "wall_seconds": time.time() - t_start, "world_size": run.info.world_size, "resumed_from": run.resumed,
               "best": {"metric": run.cfg.eval_metric, "value": run.best}}
    ema = [r for r in run.history if "ema_val_top1" in r]
    if ema:
        summary["ema_top1"] = ema[-1]["ema_val_top1"]
    if run.info.is_main:
        if run.history:
            rundir.plot_curves(run.history, os.path.join(run.run_dir, "curves.png"))
        plot_reliability_diagram(*evaluated["probs"], os.path.join(run.run_dir, "reliability.png"))
        rundir.write_model_files(run)
        summary["wall_seconds"] = time.time() - t_start
        rundir.write_json(os.path.join(run.run_dir, "summary.json"), summary)
    return summary


def train(cfg: TrainConfig, log=print) -> Dict[str, Any]:
    """Train (or resume) a run described by ``cfg``; returns the summary dict."""
    t_start = time.time()
    cfg.validate()
    cfg = TrainConfig.from_dict(cfg.to_dict())  # a copy: the resolved settings are written into it
    info = init_distributed(cfg.device)
    try:
        _setup_threads(cfg)
        run = _prepare(cfg, info, log)
        step_log = StepLog(run.run_dir if info.is_main else None, cfg.log_interval, cfg.tensorboard, run.global_step)
        total_epochs, seconds, images, evaluated = cfg.epochs + cfg.cooldown_epochs, 0.0, 0.0, None
        for epoch in range(run.start_epoch, total_epochs):
            out = train_epoch(run, epoch, step_log)
            out["record"] = record = _epoch_record(run, epoch, out)
            seconds, images = seconds + out["seconds"], images + record["_images"]
            last = epoch == total_epochs - 1 or out["stopped"]
            evaluated = None
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                evaluated = _validate(run, record)
            _end_epoch(run, epoch, out, evaluated)
            if info.is_main:
                step_log.epoch(record)
            if out["stopped"]:
                break
        step_log.close()
        summary = _finish(run, evaluated, t_start, (seconds, images))
        barrier(info)
        return summary
    finally:
        cleanup(info)
