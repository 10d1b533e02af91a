"""timm <-> vitlab keys for MobileViT (``timm.models.mobilevit``, a ``timm.models.byobnet.ByobNet``).

=====================================  =====================================
timm                                   vitlab
=====================================  =====================================
``stem.*``                             ``patch_embed.*``
``stages.{i}.0.*`` (first, strided)    ``stages.{i}.downsample.*``
``stages.{i}.{j}.*`` (j > 0)           ``stages.{i}.blocks.{j-1}.*``
``head.fc.*``                          ``head.*``
=====================================  =====================================

Every name inside a block (``conv1_1x1.conv``, ``transformer.{k}.attn.qkv``, ``conv_fusion.bn``, ...) and
``final_conv.*`` are equal.
"""
from __future__ import annotations

import re

from vitlab.interop.timm import register_rules_converter
from vitlab.models.mobilevit import MobileViT


def _from_block(m: "re.Match[str]") -> str:
    i, j = m.group(1), int(m.group(2))
    return f"stages.{i}.downsample." if j == 0 else f"stages.{i}.blocks.{j - 1}."


def _to_block(m: "re.Match[str]") -> str:
    return f"stages.{m.group(1)}.{int(m.group(2)) + 1}."


_FROM_TIMM = [(re.compile(p), r) for p, r in (
    (r"^stem\.", "patch_embed."),
    (r"^stages\.(\d+)\.(\d+)\.", _from_block),
    (r"^head\.fc\.", "head."),
)]
_TO_TIMM = [(re.compile(p), r) for p, r in (
    (r"^patch_embed\.", "stem."),
    (r"^stages\.(\d+)\.downsample\.", r"stages.\1.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", _to_block),
    (r"^head\.", "head.fc."),
)]


register_rules_converter(MobileViT, _FROM_TIMM, _TO_TIMM)
