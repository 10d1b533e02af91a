"""timm <-> vitlab keys for Swin ("Swin Transformer", Liu et al., ICCV 2021).

vitlab's :class:`~vitlab.models.swin.SwinTransformer` uses timm's key names for every part
timm has; only the classifier differs (timm ``head.fc.*``, vitlab ``head.*``).  Parts timm
lacks (FeatScale, AttnScale, conv units, weighted shortcuts, focused-linear mixers) make a
strict load fail, naming the keys.
"""
from __future__ import annotations

from vitlab.interop.timm import register_timm_converter
from vitlab.models.swin import SwinTransformer


@register_timm_converter(SwinTransformer)
class SwinConverter:
    @staticmethod
    def from_timm(sd, model):
        return {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in sd.items()}

    @staticmethod
    def to_timm(sd, model):
        return {("head.fc." + k[len("head."):] if k.startswith("head.") else k): v for k, v in sd.items()}
