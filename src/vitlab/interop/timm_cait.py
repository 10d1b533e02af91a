"""timm <-> vitlab keys for CaiT (``timm.models.cait.Cait``).

The only difference is the LayerScale naming: timm's ``blocks.{i}.gamma_1`` / ``gamma_2`` (and
the same under ``blocks_token_only``) are vitlab's shortcut parts ``ls1.gamma`` / ``ls2.gamma``.
"""
from __future__ import annotations

import re

from vitlab.interop.timm import register_timm_converter
from vitlab.models.cait import Cait

_TO_VITLAB = re.compile(r"^(blocks(?:_token_only)?\.\d+)\.gamma_([12])$")
_TO_TIMM = re.compile(r"^(blocks(?:_token_only)?\.\d+)\.ls([12])\.gamma$")


@register_timm_converter(Cait)
class CaitConverter:
    @staticmethod
    def from_timm(sd, model):
        return {_TO_VITLAB.sub(r"\1.ls\2.gamma", k): v for k, v in sd.items()}

    @staticmethod
    def to_timm(sd, model):
        return {_TO_TIMM.sub(r"\1.gamma_\2", k): v for k, v in sd.items()}
