"""timm <-> vitlab keys for Twins (``timm.models.twins.Twins``; Chu et al., NeurIPS 2021).

timm keeps the stages' parts in parallel lists; vitlab keeps them in its staged backbone:

=====================================  ==========================================
timm                                   vitlab
=====================================  ==========================================
``patch_embeds.0.*``                   ``patch_embed.*`` (the stem)
``patch_embeds.{i}.*`` (i > 0)         ``stages.{i}.downsample.*``
``blocks.{i}.{j}.*``                   ``stages.{i}.blocks.{j}.*``
``pos_block.{i}.*``                    ``stages.{i}.pos_block.*``
=====================================  ==========================================

Everything inside a block (``norm1``, ``attn.{qkv, q, kv, sr, norm, proj}``, ``norm2``, ``mlp.fc1/fc2``),
``norm`` and ``head`` are equal.  Parts timm lacks (FeatScale, AttnScale, ...) make a strict load fail,
naming the keys.
"""
from __future__ import annotations

import re
from typing import List, Tuple

from vitlab.interop.timm import register_rules_converter
from vitlab.models.twins import Twins

_Rules = List[Tuple["re.Pattern[str]", str]]

_FROM_TIMM: _Rules = [(re.compile(p), r) for p, r in (
    (r"^patch_embeds\.0\.", "patch_embed."),
    (r"^patch_embeds\.(\d+)\.", r"stages.\1.downsample."),
    (r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^pos_block\.(\d+)\.", r"stages.\1.pos_block."),
)]
_TO_TIMM: _Rules = [(re.compile(p), r) for p, r in (
    (r"^patch_embed\.", "patch_embeds.0."),
    (r"^stages\.(\d+)\.downsample\.", r"patch_embeds.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2."),
    (r"^stages\.(\d+)\.pos_block\.", r"pos_block.\1."),
)]


register_rules_converter(Twins, _FROM_TIMM, _TO_TIMM)
