"""MP3: masked position prediction ("Position Prediction as an Effective Pretraining Strategy", Zhai et al.,
ICML 2022, sec. 3), on the model contract.

* The encoder sees **no position code**: a learned position table is set to zero and frozen for the
  pretraining (fine-tuning then starts it from zero, as the paper adds position embeddings back for
  fine-tuning); a fixed (sin-cos) table is refused.
* Every patch token is a query, but only a random subset of ``L - int(L * mask_ratio)`` patches per image
  (the *context*) serve as keys and values, in every attention layer: a key-padding mask carried by the
  :class:`~vitlab.layers.TokenLayout` (prefix tokens stay keys).  Without positions, the only way to tell
  where a patch is, is its content and the context's.
* A linear head on every patch token's final features predicts its index among the ``L`` positions;
  the loss is the cross-entropy averaged over all patches (as vit-pytorch's ``mp3.py``).

The backbone must be isotropic with a patchify stem (an overlapping stem's zero padding marks the border
patches) and an attention that takes a mask (softmax-family cores).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import UserError
from vitlab.models.backbone import Backbone
from vitlab.pretrain.masking import check_ratio

__all__ = ["MP3", "context_mask"]


def context_mask(batch: int, length: int, ratio: float, num_prefix: int = 0, device=None) -> torch.Tensor:
    """``(B, P + L)`` boolean key mask: the prefix tokens and ``L - int(L * ratio)`` random patches per image."""
    keep = max(1, length - int(length * ratio))
    order = torch.rand(batch, length, device=device).argsort(dim=1)
    ctx = torch.zeros(batch, length, dtype=torch.bool, device=device).scatter_(1, order[:, :keep], True)
    return torch.cat([torch.ones(batch, num_prefix, dtype=torch.bool, device=device), ctx], dim=1)


def _attention_takes_masks(encoder: nn.Module) -> bool:
    cores = [m.core for m in encoder.modules() if hasattr(m, "core") and hasattr(m, "grouping")]
    return bool(cores) and all(c.takes_bias for c in cores)


class MP3(nn.Module):
    """Encoder (isotropic :class:`Backbone`, patchify stem) + linear position head; ``forward(imgs, epoch)``
    returns the loss; ``last`` holds the logits and the context mask."""

    def __init__(self, encoder: nn.Module, name: str, img_size: int, in_chans: int, mask_ratio: float = 0.75):
        super().__init__()
        from vitlab.pretrain.mae import refuse_leaking_stem

        if not isinstance(encoder, Backbone) or not encoder.is_isotropic:
            raise UserError(f"MP3 needs an isotropic transformer backbone (one token per patch to the end); model "
                            f"{name} is not one; use --method simmim")
        if not _attention_takes_masks(encoder):
            raise UserError(f"MP3 hides keys with an attention mask; model {name}'s attention takes none (a "
                            "linear-attention core?); use a softmax-family mixer")
        table = getattr(encoder, "pos_embed", None)
        if table is not None and not isinstance(table, nn.Parameter):
            raise UserError(f"MP3 must not see positions, but model {name} adds a fixed position code; build it with "
                            "--model-kwargs pos_embed=learned (zeroed and frozen while pretraining) or pos_embed=none")
        self.encoder, self.mask_ratio = encoder, check_ratio(mask_ratio)
        if table is not None:
            with torch.no_grad():
                table.zero_().requires_grad_(False)
        layout = refuse_leaking_stem(encoder, "MP3", name, img_size, in_chans)  # padding would mark the border
        self.num_positions = layout.num_grid
        self.head = nn.Linear(encoder.num_features, self.num_positions)
        self.last: Dict[str, torch.Tensor] = {}

    def logits(self, imgs: torch.Tensor):
        """Position logits ``(B, L, L)`` of every patch, with the ``(B, P + L)`` context mask used."""
        tokens, layout = self.encoder.forward_stem(imgs)
        p = layout.num_prefix
        keys = context_mask(tokens.shape[0], layout.num_grid, self.mask_ratio, p, tokens.device)
        feats = self.encoder.forward_tokens(tokens, layout.with_mask(keys))
        return self.head(feats[:, p:]), keys

    def forward(self, imgs: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        logits, keys = self.logits(imgs)
        b, n = logits.shape[:2]
        target = torch.arange(n, device=logits.device).expand(b, n)
        self.last = dict(logits=logits.detach(), keys=keys)
        return F.cross_entropy(logits.float().reshape(b * n, n), target.reshape(-1))
