"""What every study shares: its context (settings, output folders), the data subset (a seeded,
class-balanced ImageFolder of symbolic links), training one variant with the engine, loading it
back with the engine's checkpoint loader, and the analysis inputs (images and instrument options)."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from vitlab.errors import UserError

__all__ = ["Context", "default_data", "subset_folder", "train_variant", "load_trained", "analysis_data",
           "analysis_args", "study_data", "late_mean", "finite", "log"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Context:
    """One study run: its name, output folder, data, seed, budget override and mode."""
    name: str
    out: str
    data: str
    seed: int = 0
    epochs: Optional[int] = None  # None: the study's own budget
    quick: bool = False
    log: Callable[[str], None] = log
    notes: List[str] = field(default_factory=list)

    @property
    def work(self) -> str:
        """Training runs and the data subset (large files: not part of the report)."""
        return os.path.join(self.out, "work")

    def budget(self, default: int, quick: int = 1) -> int:
        """Epochs: ``--epochs`` if given, else the study's (quick: ``quick``)."""
        return self.epochs if self.epochs is not None else (quick if self.quick else default)


def default_data() -> str:
    """CIFAR-10 as an ImageFolder: ``$VITLAB_STUDY_DATA``, ``../shared/data/cifar10`` next to the
    working folder or next to the source tree; else ``digits`` (the bundled data set)."""
    env = os.environ.get("VITLAB_STUDY_DATA")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), os.path.join(here, "..", "..", "..")):
        cand = os.path.normpath(os.path.join(base, "..", "shared", "data", "cifar10"))
        if os.path.isdir(cand):
            return cand
    return "digits"


def _split_dirs(root: str):
    from vitlab.data.folder_info import find_split

    train, val = find_split(root, "train"), find_split(root, "val")
    if train is None or val is None:
        raise UserError(f"--data {root}: expected an ImageFolder with train/ and val/ class folders")
    return train, val


def _link_split(src: str, dst: str, per_class: int, rng: random.Random) -> int:
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not classes:
        raise UserError(f"--data: no class folders in {src}")
    n = 0
    for c in classes:
        files = sorted(f for f in os.listdir(os.path.join(src, c)) if not f.startswith("."))
        rng.shuffle(files)
        os.makedirs(os.path.join(dst, c), exist_ok=True)
        for f in files[:per_class]:
            os.symlink(os.path.abspath(os.path.join(src, c, f)), os.path.join(dst, c, f))
            n += 1
    return n


def subset_folder(src: str, dst: str, per_class_train: int, per_class_val: int, seed: int) -> Dict[str, Any]:
    """A seeded class-balanced subset of the ImageFolder ``src`` (train/ and val/) as symbolic links
    in ``dst``; reused when ``dst`` already holds the same subset.  ``digits`` passes through."""
    if src == "digits":
        return {"root": "digits", "source": "digits", "train_images": 4000, "val_images": 1000, "subset": False}
    if not os.path.isdir(src):
        raise UserError(f"--data {src!r} is not a folder; expected an ImageFolder root with train/ and val/ "
                        f"(default: CIFAR-10 in ../shared/data/cifar10) or 'digits'")
    train, val = _split_dirs(src)
    key = {"source": os.path.abspath(src), "per_class_train": per_class_train, "per_class_val": per_class_val,
           "seed": seed}
    manifest = os.path.join(dst, "subset.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            old = json.load(f)
        if {k: old.get(k) for k in key} == key:
            return old
    shutil.rmtree(dst, ignore_errors=True)
    rng = random.Random(seed)
    info = dict(key, root=dst, subset=True,
                train_images=_link_split(train, os.path.join(dst, "train"), per_class_train, rng),
                val_images=_link_split(val, os.path.join(dst, "val"), per_class_val, rng))
    with open(manifest, "w") as f:
        json.dump(info, f, indent=1)
    return info


def study_data(ctx: Context, per_class_train: int, per_class_val: int) -> Dict[str, Any]:
    """The study's data: a subset of ``ctx.data`` in ``work/data`` (see :func:`subset_folder`)."""
    info = subset_folder(ctx.data, os.path.join(ctx.work, "data"), per_class_train, per_class_val, ctx.seed)
    ctx.log(f"[{ctx.name}] data: {info['train_images']} training / {info['val_images']} validation images "
            f"from {info['source']}")
    return info


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_variant(ctx: Context, label: str, model: str, model_kwargs: Dict[str, Any], data: Dict[str, Any],
                  **settings: Any) -> Dict[str, Any]:
    """Train one variant with :func:`vitlab.engine.train` into ``work/runs/<label>`` (a previous run
    there is replaced); returns the summary, the per-step losses and whether it diverged."""
    from vitlab.engine import TrainConfig, TrainingDiverged, train

    run_dir = os.path.join(ctx.work, "runs", label)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = dict(model=model, model_kwargs=dict(model_kwargs), data=data["root"], out=run_dir, seed=ctx.seed,
               workers=0, progress=False, log_interval=1, amp="none", eval_every=0, checkpoint_hist=1)
    cfg.update(settings)
    ctx.log(f"[{ctx.name}] training {label}: {model} {model_kwargs} {settings}")
    t0, diverged, summary = time.time(), None, {}
    try:
        summary = train(TrainConfig.from_dict(cfg), log=lambda m: ctx.log(f"  {label}: {m}"))
    except TrainingDiverged as exc:
        diverged = str(exc)
        ctx.log(f"  {label}: diverged: {exc}")
    steps = _read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    keep = ("top1", "top5", "nll", "ece", "epochs", "steps", "images_per_second")
    return {"label": label, "model": model, "model_kwargs": dict(model_kwargs), "settings": settings,
            "run_dir": run_dir, "diverged": diverged, "summary": {k: summary.get(k) for k in keep},
            "loss": [s["loss"] for s in steps], "lr": [s["lr"] for s in steps],
            "wall_seconds": time.time() - t0}


def load_trained(run: Dict[str, Any]):
    """The trained model (``checkpoints/last.pt``, the final weights) through the engine's loader,
    with its preprocessing; None when the run left no checkpoint (diverged in its first epoch)."""
    from vitlab.engine.inference import load_for_inference

    path = os.path.join(run["run_dir"], "checkpoints", "last.pt")
    if not os.path.isfile(path):
        return None
    return load_for_inference(path)


def analysis_data(data: Dict[str, Any], im, n_train: int, n_eval: int, seed: int):
    """Images for the instruments from the study's validation split (training images from its
    train split), through the checkpoint's own eval transform and normalisation."""
    from vitlab.analysis.data import load_data

    geometry = dict(img_size=im.img_size, in_chans=im.in_chans, crop_pct=im.crop_pct, interpolation=im.interpolation)
    d = load_data(data["root"], n_train, n_eval, seed, geometry=geometry)
    d.mean, d.std = list(im.mean), list(im.std)
    return d


def analysis_args(**sizes: Any):
    """The options of ``vitlab analyze`` (its defaults) with ``sizes`` overriding them."""
    import argparse

    from vitlab.analysis.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    args.no_progress = True
    args.weight_decay = 0.0 if args.weight_decay is None else args.weight_decay
    for k, v in sizes.items():
        if not hasattr(args, k):
            raise ValueError(f"vitlab analyze has no option {k!r}")
        setattr(args, k, v)
    return args


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def late_mean(values: Sequence[Optional[float]], frac: float = 1 / 3) -> Optional[float]:
    """Mean of the finite values in the last ``frac`` of ``values`` (at least one entry)."""
    n = max(1, int(math.ceil(len(values) * frac)))
    tail = [v for v in list(values)[-n:] if finite(v)]
    return sum(tail) / len(tail) if tail else None
