"""timm <-> vitlab keys for Swin ("Swin Transformer", Liu et al., ICCV 2021).

vitlab's :class:`~vitlab.models.swin.SwinTransformer` uses timm's key names for every part
timm has; only the classifier differs (timm ``head.fc.*``, vitlab ``head.*``).  Parts timm
lacks (FeatScale, AttnScale, conv units, weighted shortcuts, focused-linear mixers) make a
strict load fail, naming the keys.

``from_timm`` also does what timm's ``checkpoint_filter_fn`` does for Swin, so the same
checkpoints load:

* a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is unwrapped;
* the official Swin repository's layout (patch merging at the *end* of stage ``i``, classifier
  ``head.*``) is moved to timm's (merging at the start of stage ``i + 1``);
* the non-persistent buffers old checkpoints saved (``relative_position_index``, ``attn_mask``)
  are dropped;
* relative position tables trained with another window (224 / window 7 -> 384 / window 12) are
  resized to the model's windows with the model's ``rel_pos_resize`` method (``"timm"`` by
  default: the same interpolation as timm's filter).
"""
from __future__ import annotations

import re

from vitlab.interop.timm import register_timm_converter
from vitlab.models.resize import resize_size_dependent
from vitlab.models.swin import SwinTransformer


def _unwrap(sd):
    for key in ("model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


@register_timm_converter(SwinTransformer)
class SwinConverter:
    @staticmethod
    def from_timm(sd, model):
        sd = _unwrap(dict(sd))
        official = "layers.0.downsample.reduction.weight" in sd  # the official repo merges at stage ends
        out = {}
        for k, v in sd.items():
            if official:
                k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            elif k.startswith("head.fc."):
                k = "head." + k[len("head.fc."):]
            out[k] = v
        return resize_size_dependent(model, out)

    @staticmethod
    def to_timm(sd, model):
        return {("head.fc." + k[len("head."):] if k.startswith("head.") else k): v for k, v in sd.items()}
