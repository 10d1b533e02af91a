"""timm <-> vitlab keys for PVTv2 (``timm.models.pvt_v2.PyramidVisionTransformerV2``).

vitlab's :class:`~vitlab.models.pvt_v2.PyramidVisionTransformerV2` uses timm's key names, so the
conversion is the identity; parts timm lacks (FeatScale, AttnScale, other mixers) make the
strict load fail and name the keys.
"""
from __future__ import annotations

from vitlab.interop.timm import register_identity_converter
from vitlab.models.pvt_v2 import PyramidVisionTransformerV2

register_identity_converter(PyramidVisionTransformerV2)
