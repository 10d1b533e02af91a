"""The model ``vitlab analyze`` looks at: a registered name, ``timm:NAME`` or a checkpoint.

A checkpoint written by ``vitlab train`` is rebuilt the way ``vitlab eval`` rebuilds it: at its
own image size, channels, classes and model arguments (:func:`checkpoint_geometry`); its
normalisation and eval transform travel with it.  A size that contradicts it is a ``UserError``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from vitlab.analysis.options import DEFAULT_MODEL
from vitlab.errors import UserError

__all__ = ["build_model", "checkpoint_geometry", "read_checkpoint"]


def _error(msg: str) -> Exception:
    return UserError(msg)


def _parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
    out = {}
    for it in items:
        if "=" not in it:
            raise _error(f"--model-args expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _checkpoint_config(ckpt: Dict) -> Tuple[Optional[str], Dict[str, Any], Dict[str, Any]]:
    """(model name, model overrides, whole config) from a checkpoint, tolerant of layouts:
    ``config["model"]`` a name or a dict with ``name``; overrides in ``model_overrides`` /
    ``model_kwargs`` / ``model_args`` / ``overrides`` or the rest of the model dict."""
    cfg = ckpt.get("config") or ckpt.get("args") or {}
    if not isinstance(cfg, dict):
        cfg = vars(cfg) if hasattr(cfg, "__dict__") else {}
    name, over = None, {}
    m = cfg.get("model")
    if isinstance(m, str):
        name = m
    elif isinstance(m, dict):
        name = m.get("name") or m.get("model") or m.get("arch")
        over.update({k: v for k, v in m.items() if k not in ("name", "model", "arch")})
    name = name or cfg.get("model_name") or cfg.get("arch")
    for key in ("model_overrides", "model_kwargs", "model_args", "overrides"):
        if isinstance(cfg.get(key), dict):
            over.update(cfg[key])
    for key in ("num_classes", "img_size", "in_chans"):
        if key in cfg and key not in over and isinstance(cfg[key], int):
            over[key] = cfg[key]
    return name, over, cfg


def read_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path!r} (expected a torch file saved by vitlab train): {exc}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"checkpoint {path!r} has no 'model' state dict (keys: "
                         f"{sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return ckpt


def checkpoint_geometry(ckpt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What ``vitlab eval`` reads from a checkpoint written by ``vitlab train``: image size,
    channels, classes, model keyword arguments and the eval transform (mean, std, crop_pct,
    interpolation); None for a checkpoint without them (a bare state dict and config)."""
    d = ckpt.get("data")
    if not (isinstance(d, dict) and "mean" in d and "std" in d and "img_size" in ckpt and "in_chans" in ckpt):
        return None
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return {"img_size": int(ckpt["img_size"]), "in_chans": int(ckpt["in_chans"]),
            "num_classes": int(ckpt["num_classes"]) if "num_classes" in ckpt else None,
            "mean": tuple(float(v) for v in d["mean"]), "std": tuple(float(v) for v in d["std"]),
            "crop_pct": float(d.get("crop_pct", 1.0)), "interpolation": cfg.get("interpolation") or "bicubic",
            "model_kwargs": dict(ckpt.get("model_kwargs") or cfg.get("model_kwargs") or {})}


def _geometry_overrides(geo: Dict[str, Any], user: Dict[str, Any]) -> Dict[str, Any]:
    """The model arguments of a trained checkpoint; a --model-args size/channels/classes value
    that contradicts it is an error (the weights were trained at that size)."""
    fixed = {"img_size": geo["img_size"], "in_chans": geo["in_chans"]}
    if geo["num_classes"] is not None:
        fixed["num_classes"] = geo["num_classes"]
    for k, v in fixed.items():
        if k in user and user[k] != v:
            raise _error(f"--model-args {k}={user[k]!r} contradicts the checkpoint, trained with {k}={v}; "
                         f"analyze runs a checkpoint at its own {k}")
    return {**geo["model_kwargs"], **user, **fixed}


def _create(name: str, overrides: Dict[str, Any]) -> torch.nn.Module:
    from vitlab.models.factory import create_model
    try:
        return create_model(name, **overrides)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise _error(f"cannot build model {name} with {overrides}: {str(exc).splitlines()[0]}") from None


def _timm_model(name: str, overrides: Dict[str, Any]) -> torch.nn.Module:
    """An untrained timm model with a ``default_cfg`` the instruments can read."""
    import timm
    model = timm.create_model(name[5:], pretrained=False, **overrides)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    model.default_cfg = {**cfg, "input_size": tuple(cfg.get("input_size", (3, 224, 224))), "architecture": name}
    if "in_chans" in overrides:
        c = overrides["in_chans"]
        model.default_cfg["input_size"] = (c, *model.default_cfg["input_size"][1:])
        model.default_cfg["mean"] = (sum(cfg.get("mean", (0.5,))) / len(cfg.get("mean", (0.5,))),) * c
        model.default_cfg["std"] = (sum(cfg.get("std", (0.5,))) / len(cfg.get("std", (0.5,))),) * c
    if "img_size" in overrides:
        s = overrides["img_size"]
        model.default_cfg["input_size"] = (model.default_cfg["input_size"][0], s, s)
    return model


def _load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], name: str, overrides: Dict[str, Any]):
    """Load without any resizing: a tensor of another shape (a model built at another size) is an
    error naming the key, never a silently interpolated position table."""
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise _error(f"checkpoint tensor {k} has shape {tuple(v.shape)} but {name} built with {overrides} has "
                         f"{tuple(own[k].shape)}: pass the model arguments (e.g. img_size) it was trained with")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not fit {name} with {overrides}: {str(exc).splitlines()[0]}") from None


def _checkpoint_model(args, overrides: Dict[str, Any], info: Dict[str, Any]):
    """(name, overrides, state dict) of ``args.checkpoint``; fills ``info``."""
    ckpt = read_checkpoint(args.checkpoint)
    state = ckpt["model"]
    c_name, c_over, cfg = _checkpoint_config(ckpt)
    name = args.model or c_name
    geo = checkpoint_geometry(ckpt)
    overrides = _geometry_overrides(geo, overrides) if geo else {**c_over, **overrides}
    info.update(geometry=geo, checkpoint=os.path.abspath(args.checkpoint), checkpoint_config=cfg)
    if name is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} does not name its model (config['model']); pass --model NAME")
    if "num_classes" not in overrides:
        head = state.get("head.weight")
        if head is not None and head.dim() == 2:
            overrides["num_classes"] = head.shape[0]
    return name, overrides, state


def build_model(args, data_classes: Optional[int]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The model to analyse and a description (name, overrides, checkpoint, parameters)."""
    info: Dict[str, Any] = {}
    overrides = _parse_model_args(args.model_args)
    state, name = None, args.model
    if args.checkpoint:
        name, overrides, state = _checkpoint_model(args, overrides, info)
    name = name or DEFAULT_MODEL
    if "num_classes" not in overrides and data_classes:
        overrides["num_classes"] = data_classes
    model = _timm_model(name, overrides) if name.startswith("timm:") else _create(name, overrides)
    if state is not None:
        _load_weights(model, state, name, overrides)
    model.eval()
    info.update(model=name, overrides=overrides, trained=state is not None,
                parameters=sum(p.numel() for p in model.parameters()),
                default_cfg={k: v for k, v in model.default_cfg.items() if isinstance(v, (int, float, str, tuple, list))})
    return model, info
