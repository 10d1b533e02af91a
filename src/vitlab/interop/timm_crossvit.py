"""timm <-> vitlab keys for CrossViT (``timm.models.crossvit.CrossVit``; Chen et al., ICCV 2021).

The only difference: the fusion's cross-attention is vitlab's ``separate`` projection, ``attn.{q,k,v}``, where timm
names the Linears ``attn.{wq,wk,wv}`` (``blocks.{i}.fusion.{b}[.{k}].attn``); everything else is timm's key.
"""
from vitlab.interop.timm import register_rename_converter
from vitlab.models.crossvit import CrossVit

_FUSION = r"^(blocks\.\d+\.fusion\.\d+(?:\.\d+)?\.attn)\."
register_rename_converter(CrossVit, (_FUSION + r"w([qkv])\.", r"\1.\2."), (_FUSION + r"([qkv])\.", r"\1.w\2."))
