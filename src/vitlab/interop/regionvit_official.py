"""Official RegionViT checkpoints (IBM/RegionViT, ``regionvit/regionvit.py``) <-> vitlab keys.

"RegionViT: Regional-to-Local Attention for Vision Transformers" (Chen, Panda & Fan, ICLR 2022).  timm has no
RegionViT, so the converter registered for :class:`~vitlab.models.regionvit.RegionViT` reads the official code's
keys (its ``main.py`` saves ``{"model": state_dict, ...}``, which :func:`vitlab.interop.checkpoint.read_state_dict`
unwraps); ``load_pretrained`` / ``create_pretrained`` / ``load_timm_weights`` then recognise them.  vitlab keys
pass through unchanged, and a saved vitlab model keeps vitlab's keys.

==================================================  ===============================================================
official                                            vitlab
==================================================  ===============================================================
``patch_embed.proj.weight|bias`` (``1conv`` stem)   ``patch_embed.0.*``
``patch_embed.proj.{0,3,6}.*`` (``3conv`` convs)     ``patch_embed.{0,3,6}.*``
``patch_embed.proj.{1,4}.*`` (``LayerNorm2d``)      ``patch_embed.{1,4}.norm.*``, ``(1, C, 1, 1)`` -> ``(C,)``
``cls_token.proj.*`` (the regional tokens' conv)    ``region_embed.*``
``layers.{i}.block.0.proj.0.*`` (``LayerNorm2d``)   ``layers.{i}.downsample.proj.0.norm.*``, ``(1, C, 1, 1)`` ->
                                                    ``(C,)``
``layers.{i}.block.0.proj.2.*`` (depthwise conv)    ``layers.{i}.downsample.proj.2.*``
``layers.{i}.block.0.proj_cls.*``                   dropped: the same module as ``proj`` (saved twice)
``layers.{i}.block.{j}.*`` (j >= 1)                 ``layers.{i}.blocks.{j-1}.*`` (norm0, norm1, attn.{qkv, proj,
                                                    rel_pos}, norm2, mlp.{fc1, fc2}: equal names and layouts)
``norm.*``, ``head.*``                              equal
==================================================  ===============================================================

The official ``*_peg`` variants (``layers.{i}.peg``) and detection checkpoints (``norm{0..3}``) have no vitlab
counterpart and are refused, naming the key.
"""
from __future__ import annotations

import re
from typing import Dict

import torch


__all__ = ["regionvit_from_official", "regionvit_to_official"]

StateDict = Dict[str, torch.Tensor]
_BLOCK = re.compile(r"^layers\.(\d+)\.block\.(\d+)\.(.*)$")
_STEM_NORM = re.compile(r"^patch_embed\.proj\.([14])\.(weight|bias)$")
_REFUSED = re.compile(r"^(layers\.\d+\.peg\.|norm[0-3]\.|layers\.\d+\.block\.\d+\.expand\.)")


def _block_key(i: str, j: str, rest: str, v: torch.Tensor, sd: StateDict):
    """(vitlab key, tensor) of ``layers.{i}.block.{j}.{rest}``; None for the duplicate ``proj_cls``."""
    if j != "0":
        return f"layers.{i}.blocks.{int(j) - 1}.{rest}", v
    if rest.startswith("proj_cls."):  # Projection saves its one module under both names
        twin = sd.get(f"layers.{i}.block.0.proj.{rest[len('proj_cls.'):]}")
        if twin is None or not torch.equal(twin, v):
            raise ValueError(f"layers.{i}.block.0.{rest} differs from its 'proj' twin: the official Projection "
                             f"shares one module, expected equal tensors")
        return None
    if re.match(r"^proj\.0\.(weight|bias)$", rest):  # LayerNorm2d keeps (1, C, 1, 1)
        return f"layers.{i}.downsample.proj.0.norm.{rest.split('.')[-1]}", v.reshape(-1)
    return f"layers.{i}.downsample.{rest}", v


def regionvit_from_official(state_dict: StateDict) -> StateDict:
    """The official RegionViT state dict (or ``{"model": state_dict}``) with vitlab's keys and layouts (see the
    module table)."""
    sd = state_dict.get("model", state_dict)
    out: StateDict = {}
    for k, v in sd.items():
        if _REFUSED.match(k):
            raise ValueError(f"official RegionViT key {k!r} has no vitlab counterpart: expected a classification "
                             f"checkpoint of regionvit_{{tiny,small,medium,base}} (no PEG, no detection norms)")
        m, stem_norm = _BLOCK.match(k), _STEM_NORM.match(k)
        if m:
            kv = _block_key(*m.groups(), v, sd)
            if kv is not None:
                out[kv[0]] = kv[1]
        elif stem_norm:
            out[f"patch_embed.{stem_norm.group(1)}.norm.{stem_norm.group(2)}"] = v.reshape(-1)
        elif k.startswith("patch_embed.proj."):
            rest = k[len("patch_embed.proj."):]
            out["patch_embed." + (rest if rest[0].isdigit() else "0." + rest)] = v
        elif k.startswith("cls_token.proj."):
            out["region_embed." + k[len("cls_token.proj."):]] = v
        else:
            out[k] = v
    return out


def regionvit_to_official(state_dict: StateDict) -> StateDict:
    """The inverse of :func:`regionvit_from_official` (``proj_cls`` written again as ``proj``'s twin)."""
    out: StateDict = {}
    one_conv = "patch_embed.1.norm.weight" not in state_dict
    for k, v in state_dict.items():
        if m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", k):
            out[f"layers.{m.group(1)}.block.{int(m.group(2)) + 1}.{m.group(3)}"] = v
        elif m := re.match(r"^layers\.(\d+)\.downsample\.proj\.(.*)$", k):
            rest, i = m.group(2), m.group(1)
            if rest.startswith("0.norm."):
                rest, v = "0." + rest[len("0.norm."):], v.reshape(1, -1, 1, 1)
            out[f"layers.{i}.block.0.proj.{rest}"] = out[f"layers.{i}.block.0.proj_cls.{rest}"] = v
        elif m := re.match(r"^patch_embed\.(\d)\.(norm\.)?(weight|bias)$", k):
            idx, is_norm, leaf = m.groups()
            stem = f"patch_embed.proj.{leaf}" if one_conv else f"patch_embed.proj.{idx}.{leaf}"
            out[stem] = v.reshape(1, -1, 1, 1) if is_norm else v
        elif k.startswith("region_embed."):
            out["cls_token.proj." + k[len("region_embed."):]] = v
        else:
            out[k] = v
    return out
