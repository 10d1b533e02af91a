"""timm <-> vitlab keys for LeViT (``timm.models.levit.Levit`` / ``LevitDistilled``; Graham et al., ICCV 2021).

The keys are timm's own.  timm's ``levit_conv_*`` models hold the LinearNorms' weights as 1x1 convs
``(out, in, 1, 1)``; vitlab keeps them ``(out, in)`` in every LeViT, so those are reshaped (the stem's 3x3 convs
and the head's Linears are the same in both).
"""
from __future__ import annotations

from vitlab.interop.timm import register_timm_converter
from vitlab.models.levit import Levit


def _pointwise(key: str) -> bool:
    """A LinearNorm's weight: a 1x1 conv in timm's conv layout (not the stem's convs, not the head's Linear)."""
    return key.endswith(".linear.weight") and not key.startswith(("stem.", "head.", "head_dist."))


@register_timm_converter(Levit)
class LevitConverter:
    @staticmethod
    def from_timm(sd, model):
        return {k: (v.flatten(1) if _pointwise(k) and v.ndim == 4 else v) for k, v in sd.items()}

    @staticmethod
    def to_timm(sd, model):
        conv = model.features_fmt == "NCHW"  # levit_conv_*: timm's 1x1-conv shapes
        return {k: (v[:, :, None, None] if conv and _pointwise(k) else v) for k, v in sd.items()}
