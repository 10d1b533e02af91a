"""timm <-> vitlab keys for MaxViT (timm's ``maxvit_*_tf_*``, ``timm.models.maxxvit.MaxxVit``).

========================================================  ==============================================
timm                                                      vitlab
========================================================  ==============================================
``stem.*``                                                ``patch_embed.*``
``stages.{i}.blocks.0.conv.*`` (each stage's strided one)  ``stages.{i}.downsample.*``
``head.norm.*``, ``head.pre_logits.fc.*``, ``head.fc.*``  ``fc_norm.norm.*``, ``fc_norm.fc.*``, ``head.*``
``...attn.rel_pos.relative_position_bias_table``          ``...attn.relative_position_bias_table``
========================================================  ==============================================

Every other name is equal.  The relative tables change layout too: timm's ``RelPosBiasTf`` (the official
TensorFlow code's) holds ``(heads, 2P-1, 2P-1)`` indexed by the key's offset from the query, vitlab's
``relative`` part (Swin's) ``((2P-1)^2, heads)`` indexed by the query's offset from the key, so the table is
flipped along both offsets and moved heads-last (the same bias, bit for bit).
"""
from __future__ import annotations

import re

from vitlab.interop.timm import register_timm_converter, rename_first
from vitlab.models.maxvit import MaxViT

_TABLE = "relative_position_bias_table"
_FROM_TIMM = [(re.compile(p), r) for p, r in (
    (r"^stem\.", "patch_embed."),
    (r"^stages\.(\d+)\.blocks\.0\.conv\.", r"stages.\1.downsample."),
    (r"^head\.norm\.", "fc_norm.norm."),
    (r"^head\.pre_logits\.fc\.", "fc_norm.fc."),
    (r"^head\.fc\.", "head."),
    (r"\.attn\.rel_pos\." + _TABLE + "$", ".attn." + _TABLE),
)]
_TO_TIMM = [(re.compile(p), r) for p, r in (
    (r"^patch_embed\.", "stem."),
    (r"^stages\.(\d+)\.downsample\.", r"stages.\1.blocks.0.conv."),
    (r"^fc_norm\.norm\.", "head.norm."),
    (r"^fc_norm\.fc\.", "head.pre_logits.fc."),
    (r"^head\.", "head.fc."),
    (r"\.attn\." + _TABLE + "$", ".attn.rel_pos." + _TABLE),
)]


def table_from_tf(t):
    """``(heads, 2h-1, 2w-1)`` (key minus query) -> ``((2h-1)(2w-1), heads)`` (query minus key)."""
    return t.flip(1, 2).permute(1, 2, 0).reshape(-1, t.shape[0]).contiguous()


def table_to_tf(t, window):
    """Inverse of :func:`table_from_tf` for a ``window = (h, w)`` group."""
    h, w = window
    return t.reshape(2 * h - 1, 2 * w - 1, t.shape[1]).permute(2, 0, 1).flip(1, 2).contiguous()


@register_timm_converter(MaxViT)
class MaxViTConverter:
    @staticmethod
    def from_timm(sd, model):
        return {rename_first(k, _FROM_TIMM): (table_from_tf(v) if k.endswith(_TABLE) and v.ndim == 3 else v)
                for k, v in sd.items()}

    @staticmethod
    def to_timm(sd, model):
        out = {}
        for k, v in sd.items():
            if k.endswith(_TABLE):
                v = table_to_tf(v, model.get_submodule(k[:-len(_TABLE) - 1]).rel_pos_window)
            out[rename_first(k, _TO_TIMM)] = v
        return out
