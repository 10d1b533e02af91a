"""timm <-> vitlab keys for CaiT (``timm.models.cait.Cait``).

The only difference is the LayerScale naming: timm's ``blocks.{i}.gamma_1`` / ``gamma_2`` (and
the same under ``blocks_token_only``) are vitlab's shortcut parts ``ls1.gamma`` / ``ls2.gamma``.
"""
from vitlab.interop.timm import register_rename_converter
from vitlab.models.cait import Cait

register_rename_converter(Cait, (r"^(blocks(?:_token_only)?\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma"),
                          (r"^(blocks(?:_token_only)?\.\d+)\.ls([12])\.gamma$", r"\1.gamma_\2"))
