"""timm <-> vitlab keys for the isotropic ViT/DeiT family.

vitlab's ViT uses timm's key names already, so the conversion is the identity for the
parts timm has; parts timm lacks (FeatScale, AttnScale, conv units, non-timm mixers) make
the load fail strictly, naming the keys.

The one exception is the ``parallel_scaling`` wiring (ViT-22B, Dehghani et al., ICML 2023, sec. 2; timm's
``ParallelScalingBlock`` / ``DiffParallelScalingBlock``), whose fused in-projection timm stores as one Linear.
vitlab keeps the parts apart (``attn.qkv`` and ``mlp.fc1``, so any core and grouping plugs in) and converts
exactly, block by block:

=====================================  ================================================================
timm ``blocks.{i}.``                    vitlab ``blocks.{i}.``
=====================================  ================================================================
``in_norm``                             ``norm1``
``in_proj`` rows ``[H | q | k | v]``    ``mlp.fc1`` (the first ``H`` rows, MLP hidden width) and ``attn.qkv``
``mlp_bias`` (no qkv bias)              ``mlp.fc1.bias``
``attn_out_proj`` / ``mlp_out_proj``    ``attn.proj`` / ``mlp.fc2``
``out_proj`` columns ``[C | H]``        ``attn.proj`` (no bias) and ``mlp.fc2`` (holding the one bias)
``ls.gamma``                            ``ls1.gamma``
``sub_norm``, ``lambda_*``, ``q_norm``  ``attn.sub_norm``, ``attn.lambda_*``, ``attn.q_norm`` (the attention's)
=====================================  ================================================================
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from vitlab.interop.timm import StateDict, register_timm_converter
from vitlab.models.vit import VisionTransformer


def _scaling_blocks(model: nn.Module) -> List[Tuple[str, int, int]]:
    """``(prefix, width C, MLP hidden H)`` of every block wired ``parallel_scaling`` with a two-Linear MLP."""
    found = []
    for i, blk in enumerate(getattr(model, "blocks", ())):
        mlp = getattr(blk, "mlp", None)
        if getattr(blk, "wiring", None) == "parallel_scaling" and isinstance(getattr(mlp, "fc1", None), nn.Linear):
            found.append((f"blocks.{i}", mlp.fc1.in_features, mlp.fc1.out_features))
    return found


def _block_from_timm(sd: StateDict, b: str, c: int, h: int) -> StateDict:
    """The keys of block ``b`` in vitlab's layout (popped from ``sd``)."""
    mine = {k[len(b) + 1:]: sd.pop(k) for k in [k for k in sd if k.startswith(b + ".")]}
    out: StateDict = {}
    for key, t in mine.items():
        head, _, leaf = key.partition(".")
        if head == "in_norm":
            out[f"norm1.{leaf}"] = t
        elif head == "in_proj":
            out[f"mlp.fc1.{leaf}"], out[f"attn.qkv.{leaf}"] = t[:h], t[h:]
        elif key == "mlp_bias":
            out["mlp.fc1.bias"] = t
        elif head in ("attn_out_proj", "mlp_out_proj"):
            out[f"{'attn.proj' if head == 'attn_out_proj' else 'mlp.fc2'}.{leaf}"] = t
        elif head == "out_proj":  # fused output projection: columns [attention C | MLP H], one bias
            if leaf == "weight":
                out["attn.proj.weight"], out["mlp.fc2.weight"] = t[:, :c], t[:, c:]
            else:
                out["mlp.fc2.bias"] = t
        elif head == "ls":
            out[f"ls1.{leaf}"] = t
        else:  # the attention's own tensors (sub-norm, lambdas, q/k norms) sit on timm's block
            out[f"attn.{key}"] = t
    return {f"{b}.{k}": v for k, v in out.items()}


def _block_to_timm(sd: StateDict, b: str) -> StateDict:
    """The keys of block ``b`` in timm's layout (popped from ``sd``)."""
    m = {k[len(b) + 1:]: sd.pop(k) for k in [k for k in sd if k.startswith(b + ".")]}
    out: StateDict = {"in_proj.weight": torch.cat([m.pop("mlp.fc1.weight"), m.pop("attn.qkv.weight")])}
    fc1_bias = m.pop("mlp.fc1.bias", None)
    if "attn.qkv.bias" in m:
        out["in_proj.bias"] = torch.cat([fc1_bias, m.pop("attn.qkv.bias")])
    elif fc1_bias is not None:
        out["mlp_bias"] = fc1_bias
    if "attn.proj.bias" in m or "mlp.fc2.bias" not in m:  # two output projections
        for ours, theirs in (("attn.proj", "attn_out_proj"), ("mlp.fc2", "mlp_out_proj")):
            out.update({f"{theirs}.{leaf}": m.pop(f"{ours}.{leaf}") for leaf in ("weight", "bias")
                        if f"{ours}.{leaf}" in m})
    else:  # one fused output projection
        out["out_proj.weight"] = torch.cat([m.pop("attn.proj.weight"), m.pop("mlp.fc2.weight")], dim=1)
        out["out_proj.bias"] = m.pop("mlp.fc2.bias")
    for key, t in m.items():
        head, _, leaf = key.partition(".")
        if head == "norm1":
            out[f"in_norm.{leaf}"] = t
        elif head == "ls1":
            out[f"ls.{leaf}"] = t
        else:
            out[key[len("attn."):] if head == "attn" else key] = t
    return {f"{b}.{k}": v for k, v in out.items()}


@register_timm_converter(VisionTransformer)
class VisionTransformerConverter:
    """Identity, except for the blocks wired ``parallel_scaling`` (see the module docstring)."""

    @staticmethod
    def from_timm(sd: StateDict, model: nn.Module) -> StateDict:
        sd = dict(sd)
        for b, c, h in _scaling_blocks(model):
            sd.update(_block_from_timm(sd, b, c, h))
        return sd

    @staticmethod
    def to_timm(sd: StateDict, model: nn.Module) -> StateDict:
        sd = dict(sd)
        for b, _, _ in _scaling_blocks(model):
            sd.update(_block_to_timm(sd, b))
        return sd
