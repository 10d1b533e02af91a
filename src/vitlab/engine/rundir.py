"""The run directory: ``config.yaml``, ``metrics.jsonl``, ``steps.jsonl``, ``curves.png``,
``reliability.png``, ``checkpoints/``, ``summary.json`` and the model files ``model.safetensors``
+ ``config.json`` (timm's hub layout, loadable by ``vitlab.interop.checkpoint.create_pretrained``
and, where timm has the model, by ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``).
Every file is written to a temporary name and renamed, so a failed run never leaves half a file."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List

from vitlab.engine.distributed import DistInfo, all_gather_objects
from vitlab.plotting import pyplot, save_figure

__all__ = ["default_run_dir", "write_jsonl", "write_json", "write_yaml", "write_config", "plot_curves",
           "write_model_files", "finite"]


def default_run_dir(model: str, info: DistInfo) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return all_gather_objects(os.path.join("runs", f"{model}-{stamp}"), info)[0]


def finite(d: Dict[str, Any]) -> Dict[str, Any]:
    """NaN -> None so the files are strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def write_jsonl(path: str, records: List[Dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(finite(r)) + "\n")
    os.replace(tmp, path)


def write_json(path: str, obj: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite(obj), f, indent=2)
    os.replace(tmp, path)


def write_yaml(path: str, obj: Dict[str, Any]) -> None:
    """``obj`` as YAML, written atomically (a temporary file replaced over ``path``)."""
    import yaml

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)
    os.replace(tmp, path)


def write_config(run) -> None:
    """``config.yaml``: every setting plus what was resolved from the data, model and machine."""
    resolved = run.cfg.to_dict()
    p = run.parts
    resolved["resolved"] = dict(run.data.settings, lr=p.lr, global_batch=p.global_batch, num_classes=p.num_classes,
                                classes=list(run.data.classes)[:1000], world_size=run.info.world_size,
                                steps_per_epoch=run.data.steps_per_epoch, device=str(run.info.device), amp=run.amp)
    write_yaml(os.path.join(run.run_dir, "config.yaml"), resolved)


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


def write_model_files(run) -> List[str]:
    """``model.safetensors`` + ``config.json`` of the final weights in the run directory."""
    from vitlab.interop.checkpoint import save_model_files

    ds, cfg = run.data.settings, run.cfg
    args = dict(ds.get("model_kwargs") or cfg.model_kwargs or {})
    args.update(img_size=ds["img_size"], in_chans=ds["in_chans"], num_classes=run.parts.num_classes)
    extra = dict(mean=list(ds["mean"]), std=list(ds["std"]), crop_pct=ds["crop_pct"],
                 interpolation=cfg.interpolation, input_size=[ds["in_chans"], ds["img_size"], ds["img_size"]])
    return save_model_files(run.parts.model, run.run_dir, cfg.model, args, run.data.classes, extra)
