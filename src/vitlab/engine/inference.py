"""A trained model ready for inference, from a vitlab checkpoint, a run directory or a model
directory (``config.json`` + ``model.safetensors``), with the preprocessing it was trained with."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from torch import nn

from vitlab.errors import UserError

__all__ = ["InferenceModel", "load_for_inference", "load_train_checkpoint", "collect_images", "model_input"]


@dataclass
class InferenceModel:
    model: nn.Module
    name: str
    img_size: int
    in_chans: int
    mean: List[float]
    std: List[float]
    crop_pct: float
    interpolation: str
    classes: List[str]
    data: Optional[str] = None  # the data set a vitlab train checkpoint was trained on
    data_dir: Optional[str] = None

    def transform(self):
        from vitlab.data import build_eval_transform

        return build_eval_transform(self.img_size, self.in_chans, self.mean, self.std, self.crop_pct,
                                    self.interpolation)


def load_train_checkpoint(path: str, ema: bool = False, ckpt: Optional[Dict[str, Any]] = None) -> InferenceModel:
    """The model of a ``vitlab train`` checkpoint (``ckpt``: the file's contents, if already read)."""
    from vitlab.engine.build import build_model
    from vitlab.engine.checkpoint import load_checkpoint
    from vitlab.engine.config import TrainConfig

    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if "config" not in ckpt:
        raise UserError(f"{path} has no training config; pass a checkpoint written by vitlab train or a model "
                        f"directory (config.json + model.safetensors)")
    cfg = TrainConfig.from_dict(ckpt["config"], source=f"checkpoint {path}")
    n, size, chans = int(ckpt["num_classes"]), int(ckpt["img_size"]), int(ckpt["in_chans"])
    model = build_model(cfg, n, size, chans, ckpt.get("model_kwargs"))
    state = ckpt["ema"] if ema else ckpt["model"]
    if state is None:
        raise UserError(f"{path} holds no EMA weights (train with --ema)")
    model.load_state_dict(state)
    d = ckpt["data"]
    classes = list(ckpt.get("classes") or [str(i) for i in range(n)])
    return InferenceModel(model.eval(), cfg.model, size, chans, list(d["mean"]), list(d["std"]), float(d["crop_pct"]),
                          cfg.interpolation, classes, cfg.data, cfg.data_dir)


def _from_model_dir(path: str) -> InferenceModel:
    from vitlab.interop.checkpoint import create_pretrained, read_model_config

    cfg = read_model_config(path)
    if not cfg:
        raise UserError(f"{path}: no config.json (expected a vitlab checkpoint or a model directory)")
    model, _ = create_pretrained(None, path)
    pc: Dict[str, Any] = cfg.get("pretrained_cfg") or {}
    chans, _, size = (int(v) for v in pc.get("input_size", (3, 224, 224)))
    n = int(cfg.get("num_classes") or getattr(model, "num_classes", 0))
    classes = list(cfg.get("label_names") or [str(i) for i in range(n)])
    return InferenceModel(model.eval(), cfg["architecture"], size, chans, list(pc.get("mean", (0.5,) * chans)),
                          list(pc.get("std", (0.5,) * chans)), float(pc.get("crop_pct", 1.0)),
                          str(pc.get("interpolation", "bicubic")), classes)


def load_for_inference(path: str, ema: bool = False) -> InferenceModel:
    """``path``: a vitlab checkpoint (``.pt``), a run directory (its ``checkpoints/best.pt``, else
    ``last.pt``, else its model files) or a model directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        from vitlab.engine.checkpoint import run_dir_checkpoint

        ck = run_dir_checkpoint(path)
        return load_train_checkpoint(ck, ema) if ck else _from_model_dir(path)
    if path.endswith(".json"):
        return _from_model_dir(os.path.dirname(os.path.abspath(path)))
    return load_train_checkpoint(path, ema)


def collect_images(paths: List[str]) -> List[str]:
    """Image files named directly or found (recursively, sorted) in the folders named."""
    from vitlab.data.folder_info import IMG_EXTENSIONS

    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.lower().endswith(IMG_EXTENSIONS))
            if not found:
                raise UserError(f"folder {p} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return files


def model_input(im: InferenceModel, batch: int = 1, dtype=None):
    """A random input of the model's shape (for export and checks)."""
    import torch

    return torch.randn(batch, im.in_chans, im.img_size, im.img_size, dtype=dtype)



