"""timm <-> vitlab keys for XCiT (``timm.models.xcit.Xcit``).

The only difference is the LayerScale naming: timm's ``blocks.{i}.gamma1`` / ``gamma2`` / ``gamma3`` (and
``cls_attn_blocks.{i}.gamma1`` / ``gamma2``) are vitlab's shortcut parts ``ls1.gamma`` / ``ls2.gamma`` /
``ls3.gamma`` of the one :class:`~vitlab.models.block.Block`.
"""
from __future__ import annotations

import re

from vitlab.interop.timm import register_timm_converter
from vitlab.models.xcit import Xcit

_TO_VITLAB = re.compile(r"^((?:cls_attn_)?blocks\.\d+)\.gamma([123])$")
_TO_TIMM = re.compile(r"^((?:cls_attn_)?blocks\.\d+)\.ls([123])\.gamma$")


@register_timm_converter(Xcit)
class XcitConverter:
    @staticmethod
    def from_timm(sd, model):
        return {_TO_VITLAB.sub(r"\1.ls\2.gamma", k): v for k, v in sd.items()}

    @staticmethod
    def to_timm(sd, model):
        return {_TO_TIMM.sub(r"\1.gamma\2", k): v for k, v in sd.items()}
