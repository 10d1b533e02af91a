"""timm <-> vitlab keys for the isotropic ViT/DeiT family.

vitlab's ViT uses timm's key names already, so the conversion is the identity for the
parts timm has; parts timm lacks (FeatScale, AttnScale, conv units, non-timm mixers) make
the load fail strictly, naming the keys.
"""
from __future__ import annotations

from vitlab.interop.timm import register_identity_converter
from vitlab.models.vit import VisionTransformer

register_identity_converter(VisionTransformer)
