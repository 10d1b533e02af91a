"""timm <-> vitlab keys for Swin V2 ("Swin Transformer V2", Liu et al., CVPR 2022).

vitlab's :class:`~vitlab.models.swinv2.SwinTransformerV2` uses timm's key names for every part timm has; only the
classifier differs (timm ``head.fc.*``, vitlab ``head.*``), as for Swin.  ``from_timm`` also does what timm's
``checkpoint_filter_fn`` does for Swin V2: it unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, moves the
official repository's layout (patch merging at the end of stage ``i``, classifier ``head.*``) to timm's, and drops
the non-persistent buffers old checkpoints saved (``relative_coords_table``, ``relative_position_index``,
``attn_mask``).  The continuous position bias has no size-dependent tensor, so checkpoints load into models with
other windows or image sizes unchanged.
"""
from __future__ import annotations

from vitlab.interop.timm import register_timm_converter
from vitlab.interop.timm_swin import SwinConverter, _unwrap
from vitlab.models.swinv2 import SwinTransformerV2


@register_timm_converter(SwinTransformerV2)
class SwinV2Converter:
    @staticmethod
    def from_timm(sd, model):
        sd = {k: v for k, v in _unwrap(dict(sd)).items() if not k.endswith("relative_coords_table")}
        return SwinConverter.from_timm(sd, model)

    @staticmethod
    def to_timm(sd, model):
        return SwinConverter.to_timm(sd, model)
