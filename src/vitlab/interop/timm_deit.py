"""timm <-> vitlab keys for the distilled DeiT (``VisionTransformerDistilled``).

vitlab's :class:`~vitlab.models.deit.DistilledVisionTransformer` uses timm's key names
(``dist_token``, ``head_dist`` and the ViT keys), so the conversion is the identity; parts timm
lacks make the strict load fail and name the keys.
"""
from __future__ import annotations

import vitlab.interop.timm_vit  # noqa: F401  (register the ViT converter first: later registrations win)
from vitlab.interop.timm import register_identity_converter
from vitlab.models.deit import DistilledVisionTransformer

register_identity_converter(DistilledVisionTransformer)
