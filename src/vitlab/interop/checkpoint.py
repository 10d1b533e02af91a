"""Weights from local files (never from a hub), read without unpickling code.

Readable files:

* ``.safetensors``;
* torch files (``.pt``, ``.pth``, ``.pth.tar``, ``.bin``): a vitlab checkpoint (``model`` entry),
  a timm ``train.py`` checkpoint (``state_dict`` / ``state_dict_ema`` and ``args``, an
  ``argparse.Namespace``), a ``model`` / ``state_dict`` wrapper or a bare state dict.  They are
  read with ``torch.load(weights_only=True)``; the one class allowed beyond tensors and
  containers is ``argparse.Namespace`` (timm's ``args``);
* a model directory in timm's hub layout: ``config.json`` + ``model.safetensors``
  (or ``pytorch_model.bin``).

:func:`load_pretrained` adapts what fine-tuning must change, with timm's rules: a new head for
another ``num_classes``, the first conv for another ``in_chans`` (``adapt_input_conv``), position
and relative-position tables for another image size (the model's own ``load_state_dict`` resizes
them); a part the file's blocks did not have (a block switched to another attention core, LayerScale, QK-norm)
starts from its initialisation and is reported as new; everything else must match and is loaded as is.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from vitlab.errors import UserError

__all__ = ["safe_torch_load", "read_state_dict", "read_model_config", "load_weights", "load_pretrained",
           "create_pretrained", "PretrainedReport", "save_model_files"]

StateDict = Dict[str, torch.Tensor]
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
# tables the model's own load_state_dict resizes, and buffers every model rebuilds for its own size
_RESIZED = ("pos_embed", "relative_position_bias_table")
_REBUILT = ("relative_position_index", "attn_mask")


def safe_torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` (timm's ``args``) and
    nothing else; any other object in the pickle is an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, a zip/tar error, a truncated file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path} as a weights file without running code from it: {first}") from None


def _model_file(directory: str) -> str:
    for name in MODEL_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise UserError(f"model directory {directory} holds none of {', '.join(MODEL_FILES)}")


def read_model_config(path: str) -> Dict[str, Any]:
    """``config.json`` of a model directory (or next to a weights file); ``{}`` if there is none."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        return {}
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {cfg_path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _clean(sd: Dict[str, Any]) -> StateDict:
    """Strip DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes (as timm's clean_state_dict)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: str, ema: bool = False) -> StateDict:
    """The model weights held by ``path`` (file or model directory); ``ema=True`` picks the EMA
    weights of a vitlab or timm training checkpoint."""
    if os.path.isdir(path):
        path = _model_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:
            raise UserError(f"cannot read {path} as safetensors: {exc}") from None
    obj = safe_torch_load(path)
    if isinstance(obj, dict):
        keys = ("ema", "state_dict_ema", "model_ema") if ema else ("model", "state_dict", "model_state_dict")
        for key in keys:
            if isinstance(obj.get(key), dict):
                return _clean(obj[key])
        if ema:
            raise UserError(f"{path} holds no EMA weights (looked for {', '.join(keys)})")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _clean(obj)
    raise UserError(f"{path} holds no state dict (expected a dict of tensors or a dict with "
                    f"'model'/'state_dict'), got {type(obj).__name__}")


def load_weights(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load local weights into ``model`` (strict by default; position tables are resized by
    the model's own ``load_state_dict`` where it supports that).  Use :func:`load_pretrained`
    to fine-tune with a new head or another number of input channels.  timm's keys, and the official keys of
    families timm lacks (:mod:`vitlab.interop.official`), are renamed first."""
    if not strict:
        load_pretrained(model, path)
        return model
    model.load_state_dict(_maybe_from_timm(model, read_state_dict(path), model.state_dict()), strict=True)
    return model


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did, key by key."""

    path: str
    loaded: List[str] = field(default_factory=list)  # loaded unchanged
    adapted: Dict[str, str] = field(default_factory=dict)  # key -> what was done
    new: List[str] = field(default_factory=list)  # kept at their initialisation (e.g. a new head)
    ignored: List[str] = field(default_factory=list)  # in the file, not used

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.path} as they are"]
        if self.adapted:
            parts.append("adapted " + "; ".join(f"{k} ({v})" for k, v in self.adapted.items()))
        if self.new:
            parts.append(f"newly initialised {', '.join(self.new)}")
        if self.ignored:
            parts.append(f"ignored {', '.join(self.ignored[:8])}{' ...' if len(self.ignored) > 8 else ''}")
        return "; ".join(parts)


def _classifier_keys(model: nn.Module, own: StateDict) -> List[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = [head] if isinstance(head, nn.Module) else list(head or [])
    names = [n for n, m in model.named_modules() if any(m is h for h in heads) and n]
    return [k for k in own if any(k.startswith(n + ".") for n in names)]


def _maybe_from_timm(model: nn.Module, sd: StateDict, own: StateDict) -> StateDict:
    """Rename timm keys to vitlab's where a converter exists and it matches better."""
    if set(sd) == set(own):
        return sd
    try:
        from vitlab.interop.timm import _converter

        conv = _converter(model)[0](dict(sd), model)
    except Exception:  # no converter for this model, or the file is not timm's
        return sd
    return conv if len(set(conv) & set(own)) > len(set(sd) & set(own)) else sd


def _first_conv_key(own: StateDict) -> Optional[str]:
    return next((k for k, v in own.items() if k.endswith("weight") and v.ndim == 4), None)


def _adapt(model: nn.Module, sd: StateDict, own: StateDict, rep: PretrainedReport) -> StateDict:
    """Drop a head of another size, adapt the first conv, drop size-dependent buffers."""
    heads = set(_classifier_keys(model, own))
    conv = _first_conv_key(own)
    out: StateDict = {}
    for k, v in sd.items():
        if k not in own:
            rep.ignored.append(k)
        elif not isinstance(v, torch.Tensor):
            raise UserError(f"{rep.path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        elif v.shape == own[k].shape:
            out[k] = v
        elif k in heads:
            rep.new.append(k)  # timm's rule: a classifier of another size starts afresh
        elif k == conv and v.ndim == 4 and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
            from timm.models._manipulate import adapt_input_conv

            out[k] = adapt_input_conv(own[k].shape[1], v.float()).to(v.dtype)
            rep.adapted[k] = f"in_chans {v.shape[1]} -> {own[k].shape[1]}"
        elif any(s in k for s in _RESIZED):
            out[k] = v
            rep.adapted[k] = f"resized {tuple(v.shape)} -> {tuple(own[k].shape)}"
        elif any(s in k for s in _REBUILT):
            rep.ignored.append(k)
        else:
            raise UserError(f"{rep.path}: {k} has shape {tuple(v.shape)} but the model needs {tuple(own[k].shape)} "
                            f"(only the head, the first conv and position tables are adapted)")
    return out


def _new_part_keys(model: nn.Module, missing: List[str], loaded: StateDict) -> List[str]:
    """The missing keys of parts the file's model did not have: inside a block (``vitlab.models.block.Block``) of
    which the file gives other tensors, e.g. a block switched to focused linear attention (its DWC), LayerScale or
    QK-norm for fine-tuning.  They keep their initialisation; a block the file lacks entirely stays an error."""
    from vitlab.models.block import Block

    blocks = [n for n, m in model.named_modules() if isinstance(m, Block) and n]
    owner = {k: max((n for n in blocks if k.startswith(n + ".")), key=len, default=None) for k in missing}
    given = {n for n in blocks if any(k.startswith(n + ".") for k in loaded)}
    return [k for k in missing if owner[k] in given]


def load_pretrained(model: nn.Module, path: str, ema: bool = False) -> PretrainedReport:
    """Load ``path`` into ``model`` for fine-tuning (see the module docstring); returns the report.
    Missing keys other than the new head, rebuilt buffers and new parts in loaded blocks (:func:`_new_part_keys`)
    are an error naming them."""
    rep = PretrainedReport(path=path)
    own = model.state_dict()
    sd = _maybe_from_timm(model, read_state_dict(path, ema=ema), own)
    sd = _adapt(model, sd, own, rep)
    heads = set(_classifier_keys(model, own))
    missing = [k for k in own if k not in sd and k not in heads and not any(s in k for s in _REBUILT)]
    parts = _new_part_keys(model, missing, sd)
    missing = [k for k in missing if k not in parts]
    if missing:
        raise UserError(f"{path} does not fit {type(model).__name__}: missing {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''} ({len(missing)} keys; is it another architecture?)")
    rep.new = sorted(set(rep.new) | {k for k in heads if k not in sd} | set(parts))
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise UserError(f"cannot load {path}: {str(exc).splitlines()[-1].strip()}") from None
    rep.loaded = [k for k in sd if k not in rep.adapted]
    return rep


def create_pretrained(name: Optional[str], path: str, ema: bool = False, **kwargs: Any):
    """``create_model(name, **kwargs)`` with weights from ``path`` adapted by :func:`load_pretrained`.
    ``name`` (and model arguments) may come from a model directory's ``config.json``."""
    from vitlab.models.factory import create_model

    cfg = read_model_config(path)
    name = name or cfg.get("architecture")
    if not name:
        raise UserError(f"no model name given and {path} has no config.json naming its architecture")
    kw = {**(cfg.get("model_args") or {}), **kwargs}
    model = create_model(name, **kw)
    return model, load_pretrained(model, path, ema=ema)


def save_model_files(model: nn.Module, directory: str, architecture: str, model_args: Dict[str, Any],
                     classes: Optional[List[str]] = None, extra_cfg: Optional[Dict[str, Any]] = None) -> List[str]:
    """Write ``model.safetensors`` (timm's key names) + ``config.json`` (timm's hub layout:
    ``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``), atomically."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    try:
        from vitlab.interop.timm import to_timm_state_dict

        sd = to_timm_state_dict(model)
    except ValueError:  # no timm counterpart: vitlab's own keys
        sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {k: v.contiguous().cpu() for k, v in sd.items()}
    pcfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(getattr(model, "default_cfg", {})).items()}
    pcfg.update(extra_cfg or {})
    cfg = dict(architecture=architecture, num_classes=int(getattr(model, "num_classes", 0)),
               num_features=int(getattr(model, "num_features", 0)), model_args=dict(model_args),
               pretrained_cfg=pcfg, label_names=list(classes) if classes else None)
    weights, config = os.path.join(directory, "model.safetensors"), os.path.join(directory, "config.json")
    save_file(sd, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    with open(config + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    os.replace(config + ".tmp", config)
    return [weights, config]
