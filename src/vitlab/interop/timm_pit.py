"""timm <-> vitlab keys for PiT (``timm.models.pit.PoolingVisionTransformer``; Heo et al., ICCV 2021).

Two differences, both layouts of the same tensors:

* the pooling between stages is the stage's ``downsample`` in vitlab, ``pool`` in timm
  (``transformers.{i}.downsample.{conv,fc}`` <-> ``transformers.{i}.pool.{conv,fc}``);
* the position table is stored as tokens ``(1, h*w, C)`` in vitlab, as a map ``(1, C, h, w)`` in timm.

``from_timm`` also reads the official repository's layout (``pools.{i}`` before stage ``i + 1``, as timm's
``checkpoint_filter_fn``) and resizes a position table of another grid to the model's (the one place that
does it, :func:`vitlab.models.resize.resize_size_dependent`).
"""
from __future__ import annotations

import re

from vitlab.interop.timm import register_timm_converter
from vitlab.models.pit import PoolingVisionTransformer
from vitlab.models.resize import resize_size_dependent

_POOL = re.compile(r"^transformers\.(\d+)\.pool\.")
_OFFICIAL_POOL = re.compile(r"^pools\.(\d+)\.")
_DOWN = re.compile(r"^transformers\.(\d+)\.downsample\.")


@register_timm_converter(PoolingVisionTransformer)
class PitConverter:
    @staticmethod
    def from_timm(sd, model):
        out = {}
        for k, v in sd.items():
            k = _OFFICIAL_POOL.sub(lambda m: f"transformers.{int(m.group(1)) + 1}.downsample.", k)
            k = _POOL.sub(r"transformers.\1.downsample.", k)
            if k == "pos_embed" and v.ndim == 4:  # timm's map (1, C, h, w) -> tokens (1, h*w, C)
                v = v.flatten(2).transpose(1, 2)
            out[k] = v
        return resize_size_dependent(model, out)

    @staticmethod
    def to_timm(sd, model):
        out = {}
        for k, v in sd.items():
            if k == "pos_embed":  # tokens (1, h*w, C) -> timm's map (1, C, h, w)
                v = v.transpose(1, 2).reshape(v.shape[0], v.shape[2], *model.grid_size).contiguous()
            out[_DOWN.sub(r"transformers.\1.pool.", k)] = v
        return out
