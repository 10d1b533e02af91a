"""The training loop: one plain loop (in the spirit of nanoGPT's) that a researcher can read.

``train(cfg)`` builds data, model, optimiser, schedule, EMA and loss from a
:class:`~vitlab.engine.config.TrainConfig`, trains with exact resume and DDP, evaluates
every epoch (and the EMA weights alongside) and writes the run directory:
``config.yaml``, ``metrics.jsonl``, ``curves.png``, ``reliability.png``,
``checkpoints/{last,best}.pt`` and ``summary.json``.

Training recipe ingredients follow DeiT ("Training data-efficient image transformers &
distillation through attention", Touvron et al., ICML 2021): AdamW, cosine schedule with
warmup, label smoothing, Mixup ("mixup: Beyond Empirical Risk Minimization", Zhang et al.,
ICLR 2018), CutMix (Yun et al., ICCV 2019), RandAugment, random erasing, repeated
augmentation, stochastic depth and an EMA of the weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from vitlab.engine.checkpoint import atomic_save, capture_rng, find_resume_checkpoint, load_checkpoint, restore_rng
from vitlab.engine.config import TrainConfig
from vitlab.engine.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, cleanup, init_distributed
from vitlab.plotting import pyplot, save_figure

__all__ = ["train", "evaluate", "build_model", "TrainingDiverged", "predict"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def build_model(cfg: TrainConfig, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    import vitlab

    kw = dict(cfg.model_kwargs or {})
    kw.update(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    if cfg.drop_path:
        kw["drop_path_rate"] = cfg.drop_path
    if cfg.drop:
        kw["drop_rate"] = cfg.drop
    return vitlab.create_model(cfg.model, **kw)


def data_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """The data-dependent defaults the config leaves open (size, channels, mean/std, crop)."""
    from vitlab.data import dataset_info

    info = dataset_info(cfg.data)
    small = info["kind"] != "folder"
    return dict(
        kind=info["kind"],
        img_size=cfg.img_size or info["img_size"],
        in_chans=info["in_chans"],
        mean=list(cfg.mean or info["mean"]),
        std=list(cfg.std or info["std"]),
        crop=cfg.crop or ("pad" if small else "rrc"),
        padding=cfg.padding if cfg.padding is not None else (2 if info["kind"] == "digits" else 4),
        hflip=cfg.hflip if cfg.hflip is not None else (0.0 if info["kind"] == "digits" else 0.5),
        crop_pct=cfg.crop_pct or (1.0 if small else 0.875),
    )


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, info: Optional[DistInfo] = None,
            amp: str = "none", channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels of a whole (possibly rank-sharded) loader, gathered
    from every rank in data-set order."""
    model.eval()
    probs, labels = [], []
    ctx = _autocast(TrainConfig(amp=amp), device)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx:
            logits = model(x)
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(y)
    p = torch.cat(probs) if probs else torch.zeros(0, 0)
    t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if info is not None and info.enabled:
        shards = all_gather_objects((p, t), info)
        world = info.world_size
        n = sum(s[1].numel() for s in shards)
        k = max(s[0].shape[1] for s in shards)
        p_all, t_all = torch.zeros(n, k), torch.zeros(n, dtype=torch.long)
        for r, (ps, ts) in enumerate(shards):  # rank r holds samples r, r + w, ...
            p_all[r::world] = ps
            t_all[r::world] = ts
        p, t = p_all, t_all
    return p, t


def evaluate(model: nn.Module, loader, device: torch.device, info: Optional[DistInfo] = None, amp: str = "none",
             channels_last: bool = False, n_bins: int = 15) -> Dict[str, float]:
    """top1/top5 (percent), NLL, ECE (15 bins) and the uncertainty metrics of
    :func:`vitlab.analysis.calibration.calibration_metrics`."""
    from vitlab.analysis.calibration import calibration_metrics

    p, t = predict(model, loader, device, info, amp, channels_last)
    return calibration_metrics(p, t, n_bins=n_bins)


def _default_run_dir(cfg: TrainConfig, info: DistInfo) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return all_gather_objects(os.path.join("runs", f"{cfg.model}-{stamp}"), info)[0]


def _finite(d: Dict[str, Any]) -> Dict[str, Any]:
    """NaN -> None so the files are strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _write_jsonl(path: str, records: List[Dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(_finite(r)) + "\n")
    os.replace(tmp, path)


def plot_curves(records: List[Dict[str, Any]], path: str) -> str:
    """Training curves: losses, accuracies and learning rate per epoch."""
    plt = pyplot()

    ep = [r["epoch"] + 1 for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(ep, [r["train_loss"] for r in records], "o-", label="train loss")
    axes[0].plot(ep, [r.get("val_nll", math.nan) for r in records], "s-", label="val NLL")
    axes[0].set_title("loss")
    if any(r.get("train_top1") is not None for r in records):
        axes[1].plot(ep, [r.get("train_top1") or math.nan for r in records], "o-", label="train top-1")
    axes[1].plot(ep, [r.get("val_top1", math.nan) for r in records], "s-", label="val top-1")
    if any("ema_val_top1" in r for r in records):
        axes[1].plot(ep, [r.get("ema_val_top1", math.nan) for r in records], "^-", label="EMA val top-1")
    axes[1].set_title("accuracy (%)")
    axes[2].plot(ep, [r["lr"] for r in records], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    return save_figure(fig, path, dpi=100)


def _setup_threads(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    elif cfg.workers and torch.get_num_threads() > 1 and "OMP_NUM_THREADS" not in os.environ:
        # leave the cores the loader workers use: oversubscribed intra-op threads spin and
        # were 10-25x slower on the 2-core machine than a single thread
        torch.set_num_threads(max(1, torch.get_num_threads() - int(cfg.workers)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def train(cfg: TrainConfig, log=print) -> Dict[str, Any]:
    """Train (or resume) a run described by ``cfg``; returns the summary dict."""
    import numpy as np
    import random

    from vitlab.data import build_dataset_pair, build_eval_loader, build_eval_transform, build_train_loader, \
        build_train_transform

    t_start = time.time()
    cfg.validate()
    info = init_distributed(cfg.device)
    device = info.device
    try:
        _setup_threads(cfg)

        # -- run directory and resume point --
        run_dir = cfg.out or _default_run_dir(cfg, info)
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        resume_path = None
        if cfg.resume:
            if cfg.resume == "auto":
                resume_path = find_resume_checkpoint(run_dir)
                if resume_path is None and info.is_main:
                    log(f"--resume auto: no checkpoint in {ckpt_dir}, starting from scratch")
            else:
                resume_path = cfg.resume
        ckpt = load_checkpoint(resume_path) if resume_path else None

        # -- data --
        ds = data_settings(cfg)
        train_set, val_set, classes = build_dataset_pair(cfg.data, cfg.data_dir, cfg.download, cfg.skip_broken)
        num_classes = cfg.num_classes or len(classes)
        train_tf = build_train_transform(ds["img_size"], ds["in_chans"], ds["mean"], ds["std"], crop=ds["crop"],
                                         scale_min=cfg.scale_min, padding=ds["padding"], hflip=ds["hflip"],
                                         randaug=cfg.randaug, reprob=cfg.reprob, interpolation=cfg.interpolation,
                                         color_jitter=cfg.color_jitter)
        eval_tf = build_eval_transform(ds["img_size"], ds["in_chans"], ds["mean"], ds["std"], ds["crop_pct"],
                                       cfg.interpolation)
        mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
        pin = device.type == "cuda"
        train_loader = build_train_loader(train_set, train_tf, cfg.batch_size, cfg.seed, info.world_size, info.rank,
                                          cfg.workers, cfg.repeated_aug, pin, drop_last=mixup_on)
        val_loader = build_eval_loader(val_set, eval_tf, cfg.batch_size * 2, info.world_size, info.rank,
                                       cfg.workers, pin)
        sampler = train_loader.sampler
        steps_per_epoch = len(train_loader) // cfg.accum_steps  # optimizer updates per epoch
        if steps_per_epoch < 1:
            raise ValueError(f"batch-size {cfg.batch_size} x accum-steps {cfg.accum_steps} exceeds the "
                             f"{len(sampler)} training images per rank")

        # -- model, optimiser, schedule --
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = build_model(cfg, num_classes, ds["img_size"], ds["in_chans"]).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 512
        from vitlab.engine.optim import build_optimizer, build_scheduler

        optimizer = build_optimizer(model, cfg.opt, lr, cfg.weight_decay, cfg.momentum, cfg.betas, cfg.layer_decay,
                                    cfg.weight_decay_1d, cfg.eps)
        total_updates = cfg.epochs * steps_per_epoch  # cosine length; cooldown epochs stay at min_lr
        total_epochs = cfg.epochs + cfg.cooldown_epochs
        scheduler = build_scheduler(optimizer, total_updates, int(round(cfg.warmup_epochs * steps_per_epoch)),
                                    cfg.min_lr, cfg.warmup_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema_decay)
        if mixup_on:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)
            criterion = SoftTargetCrossEntropy()
        else:
            mixup = None
            criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)

        # -- restore --
        start_epoch, start_step, history, acc_state = 0, 0, [], None
        best_top1 = -1.0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.module.load_state_dict(ckpt["ema"])
            start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
            history = list(ckpt.get("history", []))
            acc_state = ckpt.get("epoch_accum")
            best_top1 = float(ckpt.get("best_top1", -1.0))
            restore_rng(ckpt["rng"][info.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
            if info.is_main:
                log(f"resumed from {resume_path} (epoch {start_epoch}, step {start_step} of {steps_per_epoch})")

        train_model: nn.Module = model
        ddp = None
        if info.enabled:
            ddp = train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if pin else None)
        if cfg.compile:
            train_model = torch.compile(train_model)

        if info.is_main:
            os.makedirs(ckpt_dir, exist_ok=True)
            import yaml

            resolved = cfg.to_dict()
            resolved["resolved"] = dict(ds, lr=lr, global_batch=global_batch, num_classes=num_classes,
                                        classes=list(classes)[:1000], world_size=info.world_size,
                                        steps_per_epoch=steps_per_epoch, device=str(device))
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(resolved, f, sort_keys=False)
            _write_jsonl(os.path.join(run_dir, "metrics.jsonl"), history)
            nparams = sum(p.numel() for p in model.parameters())
            log(f"model {cfg.model} ({nparams / 1e6:.2f} M params) on {cfg.data}: {len(train_set)} train / "
                f"{len(val_set)} val images, {num_classes} classes, {total_epochs} epochs x {steps_per_epoch} steps, "
                f"global batch {global_batch}, lr {lr:.3g}, world size {info.world_size}, device {device}")

        def save(name: str, epoch: int, step: int, accum: Optional[Dict[str, float]]) -> str:
            """All ranks call this (RNG states are gathered); rank 0 writes."""
            rngs = all_gather_objects(capture_rng(), info)
            path = os.path.join(ckpt_dir, name)
            if info.is_main:
                atomic_save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "ema": ema.module.state_dict() if ema is not None else None, "rng": rngs,
                    "epoch": epoch, "step": step, "history": history, "epoch_accum": accum,
                    "best_top1": best_top1, "config": cfg.to_dict(), "num_classes": num_classes,
                    "img_size": ds["img_size"], "in_chans": ds["in_chans"], "classes": list(classes)[:1000],
                    "data": dict(mean=ds["mean"], std=ds["std"], crop_pct=ds["crop_pct"]),
                    "vitlab_checkpoint": 1,
                }, path)
            return path

        last_good = resume_path
        global_step = start_epoch * steps_per_epoch + start_step
        autocast = _autocast(cfg, device)
        train_seconds, train_images = 0.0, 0
        val_metrics: Dict[str, float] = {}
        val_probs: Tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))
        ema_metrics: Dict[str, float] = {}
        done = False
        for epoch in range(start_epoch, total_epochs):
            step0 = start_step if epoch == start_epoch else 0
            sampler.set_position(epoch, step0 * cfg.accum_steps * cfg.batch_size)
            acc = dict(acc_state) if (epoch == start_epoch and acc_state) else dict(loss=0.0, correct=0.0, n=0.0)
            train_model.train()
            t0 = time.time()
            n_imgs = 0
            bar = None
            if info.is_main and cfg.progress:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=step0, desc=f"epoch {epoch + 1}/{total_epochs}",
                           file=sys.stderr, leave=False, dynamic_ncols=True)
            it = iter(train_loader)
            for step in range(step0, steps_per_epoch):
                step_loss = torch.zeros((), dtype=torch.float64)
                for micro in range(cfg.accum_steps):
                    x, y = next(it)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    target = y
                    if mixup is not None:
                        x, target = mixup(x, y)
                    sync = micro == cfg.accum_steps - 1 or ddp is None
                    ctx = contextlib.nullcontext() if sync else ddp.no_sync()
                    with ctx:
                        with autocast:
                            logits = train_model(x)
                            loss = criterion(logits.float(), target)
                        scaler.scale(loss / cfg.accum_steps).backward()
                    step_loss += loss.detach().double().cpu() * len(y)
                    if mixup is None:
                        acc["correct"] += float((logits.detach().argmax(-1) == y).sum())
                    acc["n"] += len(y)
                    n_imgs += len(y)
                # non-finite check on every rank's loss (all-reduced so all ranks stop together)
                flag = torch.tensor([float(not torch.isfinite(step_loss))], dtype=torch.float64)
                if float(all_reduce_sum(flag, info)) > 0:
                    where = f"step {global_step + 1} (epoch {epoch + 1}, batch {step + 1} of {steps_per_epoch})"
                    keep = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
                    raise TrainingDiverged(f"non-finite loss ({float(step_loss):.4g}) at {where}; stopped, {keep}")
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                scheduler.step_update(global_step)
                if ema is not None:
                    ema.update(model, step=global_step)
                acc["loss"] += float(step_loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(step_loss) / max(1, cfg.batch_size * cfg.accum_steps):.3f}",
                                    lr=f"{optimizer.param_groups[-1]['lr']:.2e}", refresh=False)
                if cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0 and step + 1 < steps_per_epoch:
                    last_good = save("last.pt", epoch, step + 1, acc)
                if cfg.max_steps and global_step >= cfg.max_steps:
                    done = True
                    break
            if bar is not None:
                bar.close()
            dt = time.time() - t0
            # global throughput: images over all ranks / wall time of the epoch's training part
            imgs_all = float(all_reduce_sum(torch.tensor(float(n_imgs)), info))
            train_seconds += dt
            train_images += int(imgs_all)
            tot = all_reduce_sum(torch.tensor([acc["loss"], acc["correct"], acc["n"]], dtype=torch.float64), info)
            record: Dict[str, Any] = {
                "epoch": epoch, "step": global_step,
                "train_loss": float(tot[0] / max(tot[2], 1)),
                "train_top1": float(100 * tot[1] / max(tot[2], 1)) if mixup is None else None,
                "lr": float(optimizer.param_groups[-1]["lr"]),
                "images_per_second": imgs_all / max(dt, 1e-9), "epoch_seconds": dt,
            }
            last_epoch = epoch == total_epochs - 1 or done
            if last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                from vitlab.analysis.calibration import calibration_metrics

                val_probs = predict(model, val_loader, device, info, cfg.amp, cfg.channels_last)
                val_metrics = calibration_metrics(*val_probs, n_bins=15)
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
                if ema is not None:
                    ema_metrics = evaluate(ema.module, val_loader, device, info, cfg.amp, cfg.channels_last)
                    record.update({f"ema_val_{k}": ema_metrics[k] for k in ("top1", "top5", "nll", "ece")})
            history.append(record)
            is_best = bool(val_metrics) and "val_top1" in record and record["val_top1"] > best_top1
            if is_best:
                best_top1 = record["val_top1"]
            if info.is_main:
                _write_jsonl(os.path.join(run_dir, "metrics.jsonl"), history)
                msg = (f"epoch {epoch + 1}/{total_epochs}: train loss {record['train_loss']:.4f}"
                       + (f", val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else "")
                       + (f", EMA val top-1 {record['ema_val_top1']:.2f}%" if "ema_val_top1" in record else "")
                       + f", {record['images_per_second']:.0f} img/s")
                log(msg)
            last_good = save("last.pt", epoch + 1, 0, None)
            if info.is_main:
                if is_best:
                    import shutil

                    shutil.copyfile(last_good, os.path.join(ckpt_dir, ".best.pt.tmp"))
                    os.replace(os.path.join(ckpt_dir, ".best.pt.tmp"), os.path.join(ckpt_dir, "best.pt"))
                if cfg.keep_epoch_ckpts:
                    import shutil

                    shutil.copyfile(last_good, os.path.join(ckpt_dir, f"epoch{epoch + 1}.pt"))
            if done:
                break

        # -- final report --
        if not val_metrics:  # resumed a finished run: evaluate once
            from vitlab.analysis.calibration import calibration_metrics

            val_probs = predict(model, val_loader, device, info, cfg.amp, cfg.channels_last)
            val_metrics = calibration_metrics(*val_probs, n_bins=15)
        summary = {
            "model": cfg.model, "data": cfg.data, "run_dir": run_dir,
            "top1": val_metrics["top1"], "top5": val_metrics["top5"], "nll": val_metrics["nll"],
            "ece": val_metrics["ece"], **{k: val_metrics[k] for k in ("acc90", "unc90", "freq90", "brier")},
            "epochs": len(history), "steps": global_step,
            "images_per_second": (train_images / train_seconds) if train_seconds else None,
            "wall_seconds": time.time() - t_start, "world_size": info.world_size,
            "resumed_from": {"path": resume_path, "epoch": int(ckpt["epoch"]), "step": int(ckpt["step"])}
            if ckpt is not None else None,
        }
        if ema is not None and ema_metrics:
            summary["ema_top1"] = ema_metrics["top1"]
        if info.is_main:
            if history:
                plot_curves(history, os.path.join(run_dir, "curves.png"))
            from vitlab.analysis.calibration import plot_reliability_diagram

            plot_reliability_diagram(*val_probs, os.path.join(run_dir, "reliability.png"))
            summary["wall_seconds"] = time.time() - t_start
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump(_finite(summary), f, indent=2)
        barrier(info)
        return summary
    finally:
        cleanup(info)
