"""Official SepViT checkpoints (liwei109/SepViT, ``classification/sepvit.py``) -> vitlab keys.

"SepViT: Separable Vision Transformer" (Li, Wang, Xia, Wu, Li, Xiao, Zheng & Wen, arXiv 2203.15380, 2022).  timm
has no SepViT, so the converter registered for :class:`~vitlab.models.sepvit.SepViT` reads the official code's
keys (``{"model": state_dict}`` is unwrapped by :func:`vitlab.interop.checkpoint.read_state_dict`);
``load_pretrained`` / ``create_pretrained`` / ``load_timm_weights`` then recognise them.  vitlab keys pass
through unchanged, and a saved vitlab model keeps vitlab's keys.

=============================================  ====================================================================
official                                       vitlab
=============================================  ====================================================================
``patch_embeds.0.{proj, norm}.*``              ``patch_embed.{proj, norm}.*``
``patch_embeds.{i}.{proj, norm}.*`` (i > 0)    ``stages.{i}.downsample.{proj, norm}.*``
``pos_block.{i}.proj.0.*``                     ``stages.{i}.pos_block.proj.0.*``
``blocks.{i}.{j}.attn.DSA_qkv.*``              ``stages.{i}.blocks.{j}.attn.qkv.*``
``blocks.{i}.{j}.attn.win_tokens_norm.*``      ``stages.{i}.blocks.{j}.attn.psa.norm.*``
``blocks.{i}.{j}.attn.PSA_qk.*``               ``stages.{i}.blocks.{j}.attn.psa.qk.*``
``blocks.{i}.{j}.win_tokens``                  ``stages.{i}.blocks.{j}.attn.win_tokens``: ``(1, nW, 1, C)`` ->
                                               ``(nW, 1, C)``, **after** the block's ``norm1`` (eps 1e-6), see below
``blocks.{i}.{j}.*`` (every other name)        ``stages.{i}.blocks.{j}.*`` (norm1, attn.proj, norm2, mlp.fc1/fc2)
``norm.*``, ``head.*``                         equal
=============================================  ====================================================================

The official block concatenates its window tokens to the windows *before* ``norm1``; vitlab's mixer reads the
block's normalised tokens, so the converter stores ``norm1(win_tokens)`` (exact: LayerNorm acts token by token).
This direction only: ``norm1``'s image is not every vector, so vitlab's window tokens have no exact official form.
"""
from __future__ import annotations

import re
from typing import Dict

import torch
import torch.nn.functional as F


__all__ = ["sepvit_from_official", "OFFICIAL_BLOCK_NORM_EPS"]

StateDict = Dict[str, torch.Tensor]
OFFICIAL_BLOCK_NORM_EPS = 1e-6  # every official recipe builds its blocks with partial(nn.LayerNorm, eps=1e-6)
_ATTN = {"DSA_qkv": "qkv", "win_tokens_norm": "psa.norm", "PSA_qk": "psa.qk"}
_RULES = [(re.compile(p), r) for p, r in (
    (r"^patch_embeds\.0\.", "patch_embed."),
    (r"^patch_embeds\.(\d+)\.", r"stages.\1.downsample."),
    (r"^pos_block\.(\d+)\.", r"stages.\1.pos_block."),
    (r"^blocks\.(\d+)\.(\d+)\.attn\.(DSA_qkv|win_tokens_norm|PSA_qk)\.", lambda m: (
        f"stages.{m.group(1)}.blocks.{m.group(2)}.attn.{_ATTN[m.group(3)]}.")),
    (r"^blocks\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
)]


def _window_tokens(key: str, tokens: torch.Tensor, sd: StateDict) -> torch.Tensor:
    """``norm1`` of the block owning ``key`` applied to its ``(1, nW, 1, C)`` window tokens -> ``(nW, 1, C)``."""
    prefix = key[:-len("win_tokens")]
    weight, bias = sd.get(prefix + "norm1.weight"), sd.get(prefix + "norm1.bias")
    if weight is None or bias is None or tokens.ndim != 4 or tokens.shape[0] != 1:
        raise ValueError(f"official SepViT key {key!r}: expected a (1, windows, 1, C) tensor next to "
                         f"{prefix}norm1.weight/bias, got shape {tuple(tokens.shape)}")
    normed = F.layer_norm(tokens.double(), weight.shape, weight.double(), bias.double(), OFFICIAL_BLOCK_NORM_EPS)
    return normed[0].to(tokens.dtype)


def sepvit_from_official(state_dict: StateDict) -> StateDict:
    """The official SepViT state dict (or ``{"model": state_dict}``) with vitlab's keys and layouts (see the
    module table)."""
    sd = state_dict.get("model", state_dict)
    out: StateDict = {}
    for k, v in sd.items():
        if re.match(r"^blocks\.\d+\.\d+\.win_tokens$", k):
            v, k = _window_tokens(k, v, sd), k[:-len("win_tokens")] + "attn.win_tokens"
        for pattern, repl in _RULES:
            k, hit = pattern.subn(repl, k)
            if hit:
                break
        out[k] = v
    return out
