"""timm <-> vitlab keys for timm's ``Eva`` models that vitlab registers (:class:`vitlab.models.vit_registers.Eva`:
the sbb ``vit_*_patch16_rope_reg*_gap_256`` ViTs).

"EVA-02: A Visual Representation for Neon Genesis" (Fang et al., 2023).  The attention keys (``qkv.weight``,
``q_bias``, ``v_bias``; the zero ``k_bias`` is a buffer timm does not save) are timm's already (projection
``linear_qv_bias``); the only difference is the LayerScale naming: timm's ``blocks.{i}.gamma_1`` / ``gamma_2`` are
vitlab's branch-scale parts ``blocks.{i}.ls1.gamma`` / ``ls2.gamma``.
"""
import vitlab.interop.timm_vit  # noqa: F401  (register the ViT converter first: later registrations win)
from vitlab.interop.timm import register_rename_converter
from vitlab.models.vit_registers import Eva

register_rename_converter(Eva, (r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma"),
                          (r"^(blocks\.\d+)\.ls([12])\.gamma$", r"\1.gamma_\2"))
