"""The memory adapter: a new task on a frozen ViT, with the old task's outputs exactly unchanged.

"Fine-tuning Image Transformers using Learnable Memory", Sandler, Zhmoginov, Vladymyrov and Jackson,
CVPR 2022, sec. 3.2 ("attention masking" for non-destructive fine-tuning): a new class token, ``m``
memory tokens per layer and a new head train on a frozen backbone.  The new class token attends to
everything (itself, the frozen tokens, the layer's memory); the frozen tokens attend to neither the new
class token nor the memory.  Under that mask the frozen tokens compute exactly what they computed
before, so the frozen tokens run through the frozen blocks unchanged, and the new class token (the
mask's only other row) reads them through each block's own weights (:class:`MemoryReadout`): one
forward gives the old task's logits (:meth:`MemoryAdapter.forward_both`, bit-identical to the backbone's)
and the new task's.  Several adapters can share one backbone.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.memory import MemoryReadout
from vitlab.layers.mha import MultiHeadAttention
from vitlab.layers.mlp import Mlp
from vitlab.models.backbone import Backbone
from vitlab.models.base import VitlabModel

__all__ = ["MemoryAdapter"]


def _check_block(i: int, blk: nn.Module) -> None:
    """The adapter re-runs a block's parts for the new class token: plain pre-norm blocks of global
    attention only (one ``ValueError`` naming what does not fit)."""
    attn = getattr(blk, "attn", None)
    why = None
    if getattr(blk, "wiring", None) != "pre" or getattr(blk, "conv_units", None) is not None:
        why = f"wiring {getattr(blk, 'wiring', None)!r} / conv units (needs a plain pre-norm block)"
    elif getattr(blk, "featscale", None) is not None:
        why = "FeatScale (it mixes over all tokens)"
    elif not isinstance(attn, MultiHeadAttention):
        why = f"mixer {type(attn).__name__} (needs attention)"
    elif attn.part_names["grouping"] != "global" or attn.modifiers or attn.positions or not attn.core.forms_matrix:
        why = f"attention parts {attn.part_names} (needs global softmax-family attention without modifiers)"
    elif type(blk.mlp) is not Mlp:
        why = f"channel mixer {type(blk.mlp).__name__} (needs a token-wise MLP)"
    if why is not None:
        raise ValueError(f"MemoryAdapter cannot read block {i}: {why}")


class MemoryAdapter(VitlabModel):
    """A frozen isotropic ``backbone`` (ViT, DeiT) plus a new class token ``cls_token``, ``num_memory``
    memory tokens per block (``memory.{i}.tokens``) and a new ``head`` for ``num_classes`` classes
    (module docstring).  ``forward_features`` returns ``[new class token; the backbone's tokens]`` after the
    backbone's final norm; ``forward`` the new task's logits; :meth:`forward_both` both tasks'.  The
    backbone's parameters are frozen (``requires_grad=False``) and it stays in eval mode."""

    _global_pools = ("token",)
    _no_weight_decay_keys = VitlabModel._no_weight_decay_keys + ("memory",)

    def __init__(self, backbone: Backbone, num_memory: int, num_classes: int):
        super().__init__()
        if not isinstance(backbone, Backbone) or backbone.stage_attr != "blocks" or backbone.tail_attr:
            raise ValueError(f"MemoryAdapter needs an isotropic vitlab backbone (ViT, DeiT), got "
                             f"{type(backbone).__name__}")
        if backbone.after_block:
            raise ValueError(f"MemoryAdapter needs every block to see the same tokens; this backbone runs "
                             f"{sorted(backbone.after_block.values())} between blocks")
        if num_memory < 0 or num_classes < 0:
            raise ValueError(f"num_memory and num_classes must be >= 0, got {num_memory} and {num_classes}")
        for i, blk in enumerate(backbone.blocks):
            _check_block(i, blk)
        self.backbone = backbone.requires_grad_(False).eval()
        dim = self.num_features = backbone.num_features
        self.in_chans, self.num_classes = backbone.in_chans, num_classes
        self.cls_token = nn.Parameter(self._initial_class_token(dim))
        self.memory = nn.ModuleList([MemoryReadout(dim, num_memory) for _ in backbone.blocks])
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {**backbone.pretrained_cfg, "num_classes": num_classes,
                               "architecture": f"{backbone.pretrained_cfg.get('architecture', 'vit')}_memory"}

    @torch.no_grad()
    def _initial_class_token(self, dim: int) -> torch.Tensor:
        """The frozen class token as the backbone's first block sees it (with its position row), so the
        new task starts from the old representation; a small random token without one."""
        bb = self.backbone
        cls = getattr(bb, "cls_token", None)
        if cls is None:
            return nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02)
        pos = getattr(bb, "pos_embed", None)
        return cls.detach().clone() + (pos[:, :1] if pos is not None and not bb.no_embed_class else 0)

    def train(self, mode: bool = True) -> "MemoryAdapter":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, drop path or patch dropout in the old task's path
        return self

    # -- the contract's hooks -------------------------------------------------------------------------
    def _feature_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, TokenLayout]:
        x, layout = self.backbone.forward_stem(x)
        return (torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1),
                replace(layout, num_prefix=layout.num_prefix + 1))

    def _feature_units(self) -> Sequence[nn.Module]:
        return list(self.backbone.blocks)

    def _feature_unit(self, i: int, blk: nn.Module, x: torch.Tensor, layout: TokenLayout):
        """Block ``i``: the frozen tokens exactly as in the backbone (a contiguous copy, so the very same
        kernels run), the new class token reading them and the memory through the block's weights."""
        c, frozen = x[:, :1], x[:, 1:].contiguous()
        inner = replace(layout, num_prefix=layout.num_prefix - 1)
        y = self.backbone._block(blk, frozen, inner)
        kv = blk.norm1(torch.cat([c, frozen], dim=1))
        c = c + blk.drop_path1(blk.ls1(self.memory[i](blk.attn, kv[:, :1], kv)))
        c = c + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(c))))
        return torch.cat([c, y], dim=1), layout

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.backbone._final_norm  # the frozen tokens alone, as in the backbone: the same kernel call
        return torch.cat([norm(x[:, :1]), norm(x[:, 1:].contiguous())], dim=1)

    def _feature_info(self) -> List[Dict[str, Any]]:
        return [dict(d, module=f"backbone.{d['module']}") for d in self.backbone._feature_info()]

    def _truncate_units(self, n: int) -> None:
        self.backbone._truncate_units(n)
        self.memory = self.memory[:n]

    # -- heads ------------------------------------------------------------------------------------------
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The new task's logits from the new class token (the backbone's ``fc_norm`` first, if any)."""
        fc_norm = getattr(self.backbone, "fc_norm", None)
        t = fc_norm(x[:, 0]) if fc_norm is not None else x[:, 0]
        return t if pre_logits else self.head(t)

    def forward_both(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(old task's logits, new task's logits)`` from one forward; the first equal to ``backbone(x)``."""
        feats = self.forward_features(x)
        return self.backbone.forward_head(feats[:, 1:].contiguous()), self.forward_head(feats)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the new class token with the stem, each block's memory with its block."""
        return dict(stem=r"^cls_token|^backbone\.(?:cls_token|reg_token|pos_embed|patch_embed)",
                    blocks=[(r"^(?:backbone\.blocks|memory)\.(\d+)", None), (r"^backbone\.norm", (99999,))])
