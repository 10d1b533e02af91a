"""``vitlab eval``: evaluate a checkpoint on a data set's validation split.

Prints and writes (``metrics.json``) top-1, top-5, NLL, ECE (15 bins) and the uncertainty
metrics of Park & Kim, "How Do Vision Transformers Work?" (ICLR 2022): Acc-90, Unc-90,
Freq-90, IoU, IoU-90, Brier; saves a reliability diagram (Guo et al., "On Calibration of
Modern Neural Networks", ICML 2017) as ``reliability.png``.

With ``--knn`` and / or ``--linear-probe`` it evaluates the frozen features instead (a ``vitlab
pretrain`` checkpoint as well as a ``vitlab train`` one; :mod:`vitlab.engine.represent`) and writes
``representation.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os

__all__ = ["add_arguments", "run", "evaluate_checkpoint"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a vitlab checkpoint (runs/.../checkpoints/last.pt)")
    p.add_argument("--data", help="data set (default: the one the checkpoint was trained on): 'digits', "
                                  "'cifar10', 'cifar100', an ImageFolder root with val/ (or test/), or a folder "
                                  "of class folders")
    p.add_argument("--data-dir", help="cache folder for cifar10/cifar100")
    p.add_argument("--out", help="output folder (default: <run dir>/eval)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--bins", type=int, default=15, help="ECE bins (default 15)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast (default auto: bf16 on a CPU with native bf16, else float32)")
    p.add_argument("--skip-broken", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    g = p.add_argument_group("frozen features (also for vitlab pretrain checkpoints)")
    g.add_argument("--knn", action="store_true", help="weighted k-NN accuracy on frozen features (DINO's)")
    g.add_argument("--linear-probe", action="store_true", help="linear-probe accuracy on frozen features "
                                                               "(affine-free BatchNorm + logistic regression)")
    g.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours (default 20)")
    g.add_argument("--knn-t", type=float, default=0.07, help="k-NN vote temperature (default 0.07)")
    g.add_argument("--probe-c", type=float, default=1.0, help="linear probe: inverse L2 strength C (default 1)")


def evaluate_checkpoint(checkpoint: str, data=None, data_dir=None, out=None, ema=False, batch_size=256, workers=0,
                        bins=15, device="auto", skip_broken=False, amp="none"):
    """Evaluate ``checkpoint``; returns ``(metrics, out_dir)``."""
    from vitlab.engine.metrics import calibration_metrics, plot_reliability_diagram
    from vitlab.data import build_eval_dataset, build_eval_loader, build_eval_transform
    from vitlab.data.packing import packed_transforms, packing_geometry
    from vitlab.engine.checkpoint import load_checkpoint
    from vitlab.engine.config import TrainConfig
    from vitlab.engine.amp import resolve_amp
    from vitlab.engine.distributed import resolve_device
    from vitlab.engine.trainer import build_model, predict

    if bins < 1:
        raise ValueError(f"--bins must be >= 1, got {bins}")
    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt:
        raise ValueError(f"{checkpoint} has no training config; vitlab eval needs a checkpoint written by vitlab train")
    cfg = TrainConfig.from_dict(ckpt["config"], source=f"checkpoint {checkpoint}")
    data = data or cfg.data
    data_dir = data_dir or cfg.data_dir
    n_cls = int(ckpt["num_classes"])
    stored = list(ckpt.get("classes") or [])
    val_set, classes = build_eval_dataset(data, data_dir, stored if len(stored) == n_cls else None, skip_broken)
    if len(classes) != n_cls:
        raise ValueError(f"--data {data} has {len(classes)} classes but the checkpoint's model has {n_cls}")
    dev = resolve_device(device)
    model = build_model(cfg, n_cls, int(ckpt["img_size"]), int(ckpt["in_chans"]), ckpt.get("model_kwargs"))
    state = ckpt["ema"] if ema else ckpt["model"]
    if state is None:
        raise ValueError(f"{checkpoint} holds no EMA weights (train with --ema)")
    model.load_state_dict(state)
    model.to(dev)
    d, collate = ckpt["data"], None
    geometry = packing_geometry(model)
    if geometry is not None:  # NaViT: native sizes packed by the collate, as the run's own evaluation
        _, tf, _, collate = packed_transforms(geometry, d["mean"], d["std"], int(ckpt["in_chans"]))
    elif d.get("kind") == "clips":
        from vitlab.data.clips import build_clip_transform

        tf = build_clip_transform(d["num_frames"], int(ckpt["img_size"]), d["mean"], d["std"], False,
                                  crop_pct=d["crop_pct"])
    else:
        tf = build_eval_transform(int(ckpt["img_size"]), int(ckpt["in_chans"]), d["mean"], d["std"], d["crop_pct"],
                                  cfg.interpolation)
    loader = build_eval_loader(val_set, tf, batch_size, workers=workers, pin_memory=dev.type == "cuda",
                               collate_fn=collate)
    amp = resolve_amp(amp, dev, model)
    probs, labels = predict(model, loader, dev, amp=amp)
    metrics = calibration_metrics(probs, labels, n_bins=bins)
    metrics.update(checkpoint=os.path.abspath(checkpoint), data=data, images=len(labels), ema=bool(ema), bins=bins,
                   amp=amp)
    out = out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}, f,
                  indent=2)
    plot_reliability_diagram(probs, labels, os.path.join(out, "reliability.png"), n_bins=bins)
    return metrics, out


def _pct(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _run_representation(args: argparse.Namespace) -> int:
    from vitlab.engine.represent import evaluate_representation

    m = evaluate_representation(args.checkpoint, args.knn, args.linear_probe, args.data, args.data_dir, args.ema,
                                args.knn_k, args.knn_t, args.probe_c, args.batch_size, args.workers, args.device)
    print(f"{m['images']} images of {m['data']} ({m['train_images']} training images), {m['checkpoint_kind']} "
          f"checkpoint, {m['feature_dim']}-d frozen features")
    if "knn_top1" in m:
        print(f"k-NN top-1 (k={m['knn_k']}, T={m['knn_t']}): {m['knn_top1']:.2f}%")
    if "linear_probe_top1" in m:
        print(f"linear-probe top-1 (C={m['probe_c']}): {m['linear_probe_top1']:.2f}%")
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))), "eval")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "representation.json"), "w") as f:
        json.dump(m, f, indent=2)
    print(f"wrote {os.path.join(out, 'representation.json')}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "knn", False) or getattr(args, "linear_probe", False):
        return _run_representation(args)
    m, out = evaluate_checkpoint(args.checkpoint, args.data, args.data_dir, args.out, args.ema, args.batch_size,
                                 args.workers, args.bins, args.device, args.skip_broken, args.amp)
    print(f"{m['images']} images of {m['data']}{' (EMA weights)' if m['ema'] else ''}, amp {m['amp']}")
    print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  NLL {m['nll']:.4f}  ECE({m['bins']} bins) "
          f"{_pct(m['ece'])}  Brier {m['brier']:.4f}")
    print(f"Acc-90 {_pct(m['acc90'])}  Unc-90 {_pct(m['unc90'])}  Freq-90 {_pct(m['freq90'])}  "
          f"IoU {_pct(m['iou'])}  IoU-90 {_pct(m['iou90'])}")
    print(f"wrote {os.path.join(out, 'metrics.json')} and {os.path.join(out, 'reliability.png')}")
    return 0
