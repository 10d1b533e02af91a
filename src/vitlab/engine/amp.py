"""Mixed precision: which autocast dtype a run uses, and the autocast context.

``amp="auto"`` (the default) is bf16 on a CPU that computes bf16 natively (AVX-512 BF16 or AMX:
timm's ViT-S/16 training step and inference measured 2.0x faster than float32 on such a CPU) for
models at least ``AUTO_BF16_MIN_WIDTH`` wide, and float32 everywhere else (GPUs included, as in
timm's train.py without ``--amp``); a 64-wide ViT trained 2.1x *slower* under bf16 autocast
(casts cost more than its small matrix products save).  ``none``, ``bf16`` and ``fp16`` are
explicit.  Weights, optimizer state and the loss stay float32.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

__all__ = ["AMP_CHOICES", "AUTO_BF16_MIN_WIDTH", "cpu_has_native_bf16", "resolve_amp", "autocast"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
AUTO_BF16_MIN_WIDTH = 192


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU flags list ``avx512_bf16`` or ``amx_bf16`` (Linux ``/proc/cpuinfo``);
    ``VITLAB_NATIVE_BF16=0|1`` overrides the detection."""
    import os

    env = os.environ.get("VITLAB_NATIVE_BF16")
    if env in ("0", "1"):
        return env == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_amp(amp: str, device: torch.device, model: Optional[torch.nn.Module] = None) -> str:
    """``auto`` -> ``bf16`` on a native-bf16 CPU (for a ``model`` at least ``AUTO_BF16_MIN_WIDTH``
    wide, by its ``num_features``), else ``none``; other values pass through."""
    if amp not in AMP_CHOICES:
        from vitlab.errors import UserError

        raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        wide = model is None or int(getattr(model, "num_features", AUTO_BF16_MIN_WIDTH)) >= AUTO_BF16_MIN_WIDTH
        return "bf16" if device.type == "cpu" and wide and cpu_has_native_bf16() else "none"
    return amp


def autocast(amp: str, device: torch.device):
    """The autocast context for a resolved ``amp`` (``none``: a null context)."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
