"""timm <-> vitlab keys for XCiT (``timm.models.xcit.Xcit``).

The only difference is the LayerScale naming: timm's ``blocks.{i}.gamma1`` / ``gamma2`` / ``gamma3`` (and
``cls_attn_blocks.{i}.gamma1`` / ``gamma2``) are vitlab's shortcut parts ``ls1.gamma`` / ``ls2.gamma`` /
``ls3.gamma`` of the one :class:`~vitlab.models.block.Block`.
"""
from vitlab.interop.timm import register_rename_converter
from vitlab.models.xcit import Xcit

register_rename_converter(Xcit, (r"^((?:cls_attn_)?blocks\.\d+)\.gamma([123])$", r"\1.ls\2.gamma"),
                          (r"^((?:cls_attn_)?blocks\.\d+)\.ls([123])\.gamma$", r"\1.gamma\2"))
