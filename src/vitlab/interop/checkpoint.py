"""Loading weights from local files (never from a hub)."""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights"]


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (a vitlab checkpoint's ``model``
    entry, a ``state_dict``/``model`` wrapper, or a bare state dict), without unpickling
    arbitrary objects (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):  # EMA weights only on request (vitlab.engine.checkpoint)
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path} holds no state dict (expected a dict of tensors or a dict with 'model'/'state_dict')")


def load_weights(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load local weights into ``model`` (strict by default; position tables are resized by
    the model's own ``load_state_dict`` where it supports that)."""
    model.load_state_dict(read_state_dict(path), strict=strict)
    return model
