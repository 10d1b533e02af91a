"""timm <-> vitlab keys for the isotropic ViT/DeiT family.

vitlab's ViT uses timm's key names already, so the conversion is the identity for the
parts timm has; parts timm lacks (FeatScale, AttnScale, conv units, non-timm mixers) make
the load fail strictly, naming the keys.
"""
from __future__ import annotations

from vitlab.interop.timm import register_timm_converter
from vitlab.models.vit import VisionTransformer


@register_timm_converter(VisionTransformer)
class ViTConverter:
    @staticmethod
    def from_timm(sd, model):
        return dict(sd)

    @staticmethod
    def to_timm(sd, model):
        return dict(sd)
