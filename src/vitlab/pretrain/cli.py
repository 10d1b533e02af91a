"""``vitlab pretrain``: self-supervised pretraining (MAE, SimMIM, DINO, MPP) of a registered backbone.

``vitlab pretrain --method mae`` pretrains the default digits ViT (patchify stem) on the bundled
digits; the run directory holds ``checkpoints/last.pt``, whose encoder ``vitlab train --pretrained
PATH`` fine-tunes with a new head (the command is printed at the end).  Under ``torchrun
--nproc_per_node N -m vitlab pretrain ...`` it trains data-parallel (DDP).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from vitlab.engine.train_cli import FLAG, _floats, _kwargs

__all__ = ["add_arguments", "run", "config_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--method", choices=["mae", "simmim", "dino", "mpp", "mp3"], help="pretraining method (default mae)")
    g.add_argument("--model", help="registered backbone (default: vitlab train's digits ViT with a patchify stem)")
    g.add_argument("--model-kwargs", type=_kwargs, help="model arguments, e.g. 'depth=6,embed_dim=192' (replace the "
                                                        "default model's)")
    g.add_argument("--data", help="'digits' (bundled, default), 'cifar10', 'cifar100' or an ImageFolder root")
    g.add_argument("--data-dir", help="cache folder for cifar10/cifar100")
    g.add_argument("--download", **FLAG, help="download cifar10/100 if missing")
    g.add_argument("--img-size", type=int, help="input size (default: the data's)")
    g.add_argument("--out", help="run directory (default runs/<method>-<model>-<timestamp>)")
    g.add_argument("--resume", help="'auto' (newest checkpoint in --out) or a checkpoint path")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resumable)")
    g.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N steps (0: epoch ends only)")
    g.add_argument("--eval", choices=["knn", "none"], help="k-NN accuracy of the frozen encoder at the start and "
                                                          "the end (default knn)")
    g.add_argument("--knn-k", type=int, help="neighbours of the k-NN evaluation (default 20)")
    g.add_argument("--knn-t", type=float, help="temperature of the k-NN vote weights (default 0.07)")
    for flag, kind, text in (("--seed", int, "random seed (default 0)"), ("--device", str, "auto | cpu | cuda"),
                             ("--threads", int, "torch intra-op threads"), ("--workers", int, "loader workers"),
                             ("--log-interval", int, "steps between steps.jsonl records (0: off)")):
        g.add_argument(flag, type=kind, help=text)
    g.add_argument("--progress", **FLAG, help="progress output (default on)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress output")
    g.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    _optim_arguments(p.add_argument_group("optimisation (defaults per method: docs/pretraining.md)"))
    _method_arguments(p.add_argument_group("MAE / SimMIM / MPP"), p.add_argument_group("DINO"))


def _optim_arguments(g) -> None:
    g.add_argument("--epochs", type=int, help="epochs (default: mae 30, simmim 30, dino 20, mpp 30, mp3 30)")
    g.add_argument("--batch-size", type=int, help="batch size per process (default 64)")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine, linear warmup)")
    g.add_argument("--min-lr", type=float, help="final learning rate (default 1e-6)")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup epochs")
    g.add_argument("--weight-decay", type=float, help="weight decay (not on 1-D parameters)")
    g.add_argument("--betas", type=_floats(2), help="AdamW betas (MAE: 0.9,0.95)")
    g.add_argument("--clip-grad", type=float, help="MAE/SimMIM: max global gradient norm; DINO: per parameter "
                                                   "(default 3; 0: off)")
    g.add_argument("--drop-path", type=float, help="stochastic depth of the (student) encoder (DINO: 0.1)")


def _method_arguments(m, d) -> None:
    m.add_argument("--mask-ratio", type=float, help="fraction of masked patches (MAE 0.75, SimMIM 0.6, MPP 0.5; MP3: hidden from the keys, 0.75)")
    m.add_argument("--mpp-bits", type=int, help="MPP: bits per channel of the mean-colour target (default 3)")
    m.add_argument("--norm-pix-loss", **FLAG, help="MAE: per-patch normalised pixel targets")
    m.add_argument("--decoder-dim", type=int, help="MAE decoder width (default 64)")
    m.add_argument("--decoder-depth", type=int, help="MAE decoder blocks (default 2)")
    m.add_argument("--decoder-heads", type=int, help="MAE decoder heads (default 4)")
    m.add_argument("--decoder-head-dim", type=int, help="MAE decoder width per head (default: decoder width / heads)")
    m.add_argument("--mask-patch", type=int, help="SimMIM mask cell in pixels (default: see docs)")
    d.add_argument("--local-crops", type=int, help="local crops per image (default 6; 0: global crops only)")
    d.add_argument("--local-size", type=int, help="local crop size (default: 96/224 of the image, a patch multiple)")
    d.add_argument("--global-scale", type=_floats(2), help="area range of the global crops (default 0.4,1)")
    d.add_argument("--local-scale", type=_floats(2), help="area range of the local crops (default 0.05,0.4)")
    for flag, text in (("--out-dim", "prototypes K (default 1024; reference 65536)"),
                       ("--hidden-dim", "head MLP width (default 512; reference 2048)"),
                       ("--bottleneck-dim", "head bottleneck (default 128; reference 256)"),
                       ("--warmup-teacher-temp-epochs", "teacher temperature warm-up epochs (default epochs/10)"),
                       ("--freeze-last-layer", "epochs with the head's last layer frozen (default 1)")):
        d.add_argument(flag, type=int, help=text)
    for flag, text in (("--teacher-temp", "teacher temperature after warm-up (default 0.07)"),
                       ("--warmup-teacher-temp", "initial teacher temperature (default 0.04)"),
                       ("--student-temp", "student temperature (default 0.1)"),
                       ("--center-momentum", "centre EMA momentum (default 0.9)"),
                       ("--momentum-teacher", "initial teacher EMA momentum, cosine to 1 (default 0.996)")):
        d.add_argument(flag, type=float, help=text)


def config_from_args(args: argparse.Namespace):
    from vitlab.engine.checkpoint import load_checkpoint, resume_checkpoint, run_dir_of
    from vitlab.errors import UserError
    from vitlab.pretrain.config import PretrainConfig

    overrides: Dict[str, Any] = {k: v for k, v in vars(args).items()
                                 if k not in ("traceback", "command") and v is not None}
    path = resume_checkpoint(overrides.get("resume"), overrides.get("out"))
    if path:
        ckpt = load_checkpoint(path)
        if "pretrain_config" not in ckpt:
            raise UserError(f"--resume {path}: not a vitlab pretrain checkpoint")
        stored = dict(ckpt["pretrain_config"], **overrides)
        if not overrides.get("out"):
            stored["out"] = run_dir_of(path)
        return PretrainConfig.from_dict(stored)
    return PretrainConfig.from_dict(overrides)


def run(args: argparse.Namespace) -> int:
    from vitlab.pretrain.runner import pretrain

    summary = pretrain(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        if summary.get("knn_top1") is not None:
            print(f"k-NN top-1 {summary['knn_top1']:.2f}%")
        print(f"run directory: {summary['run_dir']}")
        print(f"fine-tune: {summary.get('finetune')}")
    return 0
