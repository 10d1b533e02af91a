"""timm <-> vitlab keys for NesT (``timm.models.nest.Nest``; Zhang et al., AAAI 2022).

=============================================  ==============================================
timm                                           vitlab
=============================================  ==============================================
``levels.{i}.pool.{conv,norm}.*``              ``levels.{i}.downsample.{conv,norm}.*``
``levels.{i}.transformer_encoder.{j}.*``       ``levels.{i}.blocks.{j}.*``
``levels.{i}.pos_embed`` ``(1, T, N, C)``      ``levels.{i}.pos_embed`` ``(1, H*W, C)`` (raster order)
``...attn.proj.weight`` columns ``d * H + h``  columns ``h * D + d``
=============================================  ==============================================

timm's NesT attention concatenates its heads' outputs channel-major (``permute(0, 2, 3, 4, 1)``: channel
``d`` of head ``h`` at ``d * H + h``), vitlab's head-major (``h * D + d``) as every other family, so the
output projection's input columns are permuted; the models compute the same function.

Everything inside a block (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1/fc2``),
``patch_embed.proj``, ``norm`` and ``head`` are equal.  A position table of another image size is resized
to the model's map by vitlab's one resizer (:mod:`vitlab.models.resize`, as every staged table; timm's NesT
filter looks for ``pos_embed_*`` keys and never resizes).  Parts timm lacks (FeatScale, AttnScale, ...) make
a strict load fail, naming the keys.
"""
from __future__ import annotations

import re
from typing import List, Tuple

from vitlab.interop.timm import register_timm_converter, rename_first
from vitlab.models.nest import Nest, blocks_to_raster, raster_to_blocks
from vitlab.models.resize import resize_size_dependent

_Rules = List[Tuple["re.Pattern[str]", str]]

_FROM_TIMM: _Rules = [(re.compile(p), r) for p, r in (
    (r"^levels\.(\d+)\.pool\.", r"levels.\1.downsample."),
    (r"^levels\.(\d+)\.transformer_encoder\.", r"levels.\1.blocks."),
)]
_TO_TIMM: _Rules = [(re.compile(p), r) for p, r in (
    (r"^levels\.(\d+)\.downsample\.", r"levels.\1.pool."),
    (r"^levels\.(\d+)\.blocks\.", r"levels.\1.transformer_encoder."),
)]
_POS = re.compile(r"^levels\.\d+\.pos_embed$")
_PROJ = re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.attn\.proj\.weight$")


def _heads(model, key: str) -> int:
    i, j = map(int, _PROJ.match(key).groups())
    return model.levels[i].blocks[j].attn.num_heads


def _proj_from_timm(w, heads: int):
    """Input columns ``d * H + h`` (timm) -> ``h * D + d`` (vitlab)."""
    out, c = w.shape
    return w.reshape(out, c // heads, heads).transpose(1, 2).reshape(out, c)


def _proj_to_timm(w, heads: int):
    out, c = w.shape
    return w.reshape(out, heads, c // heads).transpose(1, 2).reshape(out, c)


def _from_timm_tensor(model, key: str, v):
    if _POS.match(key) and v.ndim == 4:
        return blocks_to_raster(v)
    return _proj_from_timm(v, _heads(model, key)) if _PROJ.match(key) else v


def _to_timm_tensor(model, key: str, v):
    if _POS.match(key):
        return raster_to_blocks(v, model.block_size)
    return _proj_to_timm(v, _heads(model, key)) if _PROJ.match(key) else v


@register_timm_converter(Nest)
class NestConverter:
    @staticmethod
    def from_timm(sd, model):
        out = {}
        for k, v in sd.items():
            k = rename_first(k, _FROM_TIMM)
            out[k] = _from_timm_tensor(model, k, v)
        return resize_size_dependent(model, out)

    @staticmethod
    def to_timm(sd, model):
        return {rename_first(k, _TO_TIMM): _to_timm_tensor(model, k, v) for k, v in sd.items()}
