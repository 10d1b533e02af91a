"""timm <-> vitlab keys for timm's ``VisionTransformerSAM`` (``samvit_*``; :mod:`vitlab.models.samvit`).

"Segment Anything" (Kirillov et al., ICCV 2023).  Every key is timm's except two:

=============================  ===============================  ==========================================
timm                           vitlab                           why
=============================  ===============================  ==========================================
``pos_embed`` ``(1, h, w, C)``  ``pos_embed`` ``(1, h*w, C)``    vitlab's one position-table layout (resized
                                                                 on load in one place)
``head.fc.{weight,bias}``      ``head.{weight,bias}``           the classifier is a Linear (model contract)
=============================  ===============================  ==========================================
"""
from __future__ import annotations

from torch import nn

import vitlab.interop.timm_vit  # noqa: F401  (register the ViT converter first: later registrations win)
from vitlab.interop.timm import StateDict, register_timm_converter
from vitlab.models.samvit import VisionTransformerSAM


@register_timm_converter(VisionTransformerSAM)
class SamConverter:
    @staticmethod
    def from_timm(sd: StateDict, model: nn.Module) -> StateDict:
        out = {}
        for key, val in sd.items():
            if key == "pos_embed" and val.ndim == 4:
                val = val.flatten(1, 2)
            out["head." + key[len("head.fc."):] if key.startswith("head.fc.") else key] = val
        return out

    @staticmethod
    def to_timm(sd: StateDict, model: nn.Module) -> StateDict:
        out = {}
        for key, val in sd.items():
            if key == "pos_embed":
                val = val.reshape(1, *model.grid_size, val.shape[-1])
            out["head.fc." + key[len("head."):] if key.startswith("head.") else key] = val
        return out
