"""The one place where size-dependent tensors of a checkpoint are fitted to a model of another size.

When a checkpoint trained at one image size (or window) is loaded into a model built for another
(the 224 -> 384 fine-tuning of ViT, DeiT, Swin, CaiT, PVT), three kinds of tensors change shape:

* learned position tables ``pos_embed`` ``(1, P + h*w, C)`` of the model or of a stage: the grid rows
  are resampled bicubically to the owner's ``grid_size``, prefix rows kept (ViT, Dosovitskiy et al.);
  one table per token stream, ``pos_embed_{b}`` (CrossViT), to the owner's ``pos_embed_grids[b]``;
* relative position tables ``((2w-1)^2, heads)``: resized to the owning attention's window
  (``"timm"``: timm's ``checkpoint_filter_fn``; ``"bicubic"``: the official Swin code);
* FLatten's key position codes ``attn.pos_enc`` ``(1, P + h*w, C)``: resampled to the attention's key grid.

Buffers that older checkpoints saved (``relative_position_index``, ``attn_mask``) are dropped.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from vitlab.layers.pos_embed import resample_pos_embed
from vitlab.layers.window import resize_relative_position_table

__all__ = ["resize_size_dependent"]

_STREAM_TABLE = re.compile(r"(?:.*\.)?pos_embed_(\d+)")  # CrossViT's pos_embed_{b}, one per token stream


def _owner(model: nn.Module, key: str, leaf: str) -> nn.Module:
    path = key[:-len(leaf)].rstrip(".")
    return model.get_submodule(path) if path else model


def _resample(key: str, val: torch.Tensor, own: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """A ``(1, P + h*w, C)`` table resampled to ``grid``; ``P`` is what the model's table holds besides it."""
    prefix = own.shape[1] - math.prod(grid)
    n_old = val.shape[1] - prefix
    side = math.isqrt(max(n_old, 0))
    if prefix < 0 or side * side != n_old:
        raise ValueError(f"cannot resize {key} of shape {tuple(val.shape)} to {tuple(own.shape)}: the checkpoint's "
                         f"{n_old} grid tokens are not a square grid")
    return resample_pos_embed(val, tuple(grid), (side, side), prefix)


def resize_size_dependent(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                          rel_pos_resize: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose input-size-dependent tensors are resized to ``model``'s (see the
    module docstring); ``rel_pos_resize`` defaults to the model's ``rel_pos_resize``, else ``"timm"``."""
    method = rel_pos_resize or getattr(model, "rel_pos_resize", "timm")
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.endswith("relative_position_index") or k.endswith("attn_mask")) or k in own}
    for key, val in list(state_dict.items()):
        if key not in own or own[key].shape == val.shape:
            continue
        if key.endswith("relative_position_bias_table"):
            owner = _owner(model, key, "relative_position_bias_table")
            state_dict[key] = resize_relative_position_table(val, owner.rel_pos_window, method=method)
        elif key.endswith("pos_embed"):
            state_dict[key] = _resample(key, val, own[key], _owner(model, key, "pos_embed").grid_size)
        elif (stream := _STREAM_TABLE.fullmatch(key)) is not None:
            owner = _owner(model, key, key.rsplit(".", 1)[-1])
            state_dict[key] = _resample(key, val, own[key], owner.pos_embed_grids[int(stream.group(1))])
        elif key.endswith("pos_enc"):
            owner = _owner(model, key, "pos_enc")
            grid, _ = owner.grouping.key_grid(owner.layout)
            state_dict[key] = _resample(key, val, own[key], grid)
    return state_dict
