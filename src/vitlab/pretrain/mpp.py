"""MPP: masked patch prediction, the self-supervision experiment of the ViT paper ("An Image is
Worth 16x16 Words", Dosovitskiy et al., ICLR 2021, section 4.6 and appendix B.1.2), as vit-pytorch's
``mpp.py`` implements it.

* ``ceil(L * mask_ratio)`` of the ``L`` patches of every image are selected (50% by default, the
  paper's); a selected patch is replaced by a learned mask patch with probability 0.8, by another
  patch of the same image (drawn uniformly) with probability 0.1, and left unchanged with
  probability 0.1 (BERT's 80/10/10).  As in vit-pytorch, the corruption acts on the pixel patches
  before the patch embedding (the mask token is a learned ``p x p x C`` patch): for a patchify stem
  this is the paper's corruption of patch embeddings, the position table added after it.  An
  overlapping stem would leak corrupted pixels into other tokens and is refused (as by MAE).
* The target of each patch is its mean colour, un-normalised to ``[0, 1]`` (clamped), quantised to
  ``bits`` bits per channel, ``q_c = min(floor(mean_c * 2**bits), 2**bits - 1)``, and numbered
  ``sum_c q_c * (2**bits)**c`` (vit-pytorch's order: channel 0 least significant): 512 classes for
  RGB at 3 bits, 8 for grey digits.
* A linear head on the encoder's final grid tokens predicts the class; the loss is the
  cross-entropy averaged over the selected patches only (the unchanged 10% included, as BERT).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import UserError
from vitlab.models.backbone import Backbone
from vitlab.pretrain.masking import check_ratio, patchify, unpatchify

__all__ = ["MPP", "mpp_targets", "mpp_corrupt", "mpp_loss"]


def mpp_targets(imgs: torch.Tensor, patch: int, mean: Sequence[float], std: Sequence[float],
                bits: int = 3) -> torch.Tensor:
    """``(B, L)`` colour classes of the patches of normalised ``imgs`` (see the module docstring)."""
    c = imgs.shape[1]
    m = torch.as_tensor(list(mean), dtype=imgs.dtype, device=imgs.device).view(1, c, 1, 1)
    s = torch.as_tensor(list(std), dtype=imgs.dtype, device=imgs.device).view(1, c, 1, 1)
    x = (imgs * s + m).clamp(0.0, 1.0)
    b, _, h, w = x.shape
    avg = x.reshape(b, c, h // patch, patch, w // patch, patch).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
    levels = 2 ** bits
    q = (avg * levels).floor().clamp(max=levels - 1).long()  # (B, L, C)
    weights = levels ** torch.arange(c, device=imgs.device)
    return (q * weights).sum(-1)


def mpp_corrupt(patches: torch.Tensor, ratio: float, mask_patch: torch.Tensor,
                generator: Optional[torch.Generator] = None, replace_prob: float = 0.8,
                random_prob: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt ``(B, L, D)`` pixel patches: of the ``ceil(L * ratio)`` selected ones a share ``replace_prob``
    becomes the mask patch, ``random_prob`` another patch of the image, the rest stays (BERT's 80/10/10 by
    default); returns the corrupted patches, ``selected`` ``(B, L)`` (bool) and ``kind`` ``(B, L)`` (0 untouched,
    1 mask patch, 2 random patch, 3 selected but kept)."""
    b, length, _ = patches.shape
    dev = patches.device
    count = int(math.ceil(length * ratio))
    order = torch.rand(b, length, device=dev, generator=generator).argsort(dim=1)
    selected = torch.zeros(b, length, dtype=torch.bool, device=dev).scatter_(1, order[:, :count], True)
    u = torch.rand(b, length, device=dev, generator=generator)
    as_mask = selected & (u < replace_prob)
    as_random = selected & (u >= replace_prob) & (u < replace_prob + random_prob)
    source = torch.randint(0, length, (b, length), device=dev, generator=generator)
    random_patches = torch.gather(patches, 1, source.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    out = torch.where(as_random.unsqueeze(-1), random_patches, patches)
    out = torch.where(as_mask.unsqueeze(-1), mask_patch.to(out.dtype).expand_as(out), out)
    kind = selected.long() * 3 - as_mask.long() * 2 - as_random.long()
    return out, selected, kind


def mpp_loss(logits: torch.Tensor, target: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the selected patches only."""
    return F.cross_entropy(logits[selected], target[selected])


class MPP(nn.Module):
    """Encoder (an isotropic :class:`Backbone` with a patchify stem) + linear colour head;
    ``forward(imgs, epoch)`` returns the loss; ``last`` holds logits, targets and the corruption."""

    def __init__(self, encoder: nn.Module, name: str, img_size: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float], mask_ratio: float = 0.5, bits: int = 3, replace_prob: float = 0.8,
                 random_prob: float = 0.1):
        super().__init__()
        from vitlab.pretrain.mae import refuse_leaking_stem

        if not isinstance(encoder, Backbone) or not encoder.is_isotropic:
            raise UserError(f"MPP needs an isotropic transformer backbone (one token per patch to the end); model "
                            f"{name} is not one; use --method simmim")
        if not 1 <= int(bits) <= 8:
            raise UserError(f"--mpp-bits {bits!r}: expected 1 to 8 bits per channel")
        if not (0.0 <= replace_prob and 0.0 <= random_prob and replace_prob + random_prob <= 1.0):
            raise UserError(f"MPP's shares of the selected patches: replace_prob={replace_prob} and random_prob="
                            f"{random_prob} must be >= 0 with a sum <= 1")
        self.encoder, self.mask_ratio, self.bits = encoder, check_ratio(mask_ratio), int(bits)
        self.replace_prob, self.random_prob = float(replace_prob), float(random_prob)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        layout = refuse_leaking_stem(encoder, "MPP", name, img_size, in_chans)  # corrupted pixels would leak
        self.grid, self.patch, self.in_chans = layout.hw, img_size // layout.hw[0], in_chans
        self.mask_patch = nn.Parameter(torch.randn(1, 1, self.patch ** 2 * in_chans))  # vit-pytorch: randn
        self.head = nn.Linear(encoder.num_features, 2 ** (self.bits * in_chans))
        self.last: Dict[str, torch.Tensor] = {}

    def logits(self, imgs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits of every patch of the corrupted ``imgs``, ``selected`` and ``kind``."""
        patches, selected, kind = mpp_corrupt(patchify(imgs, self.patch), self.mask_ratio, self.mask_patch,
                                              replace_prob=self.replace_prob, random_prob=self.random_prob)
        tokens, layout = self.encoder.forward_stem(unpatchify(patches, self.patch, self.grid, self.in_chans))
        feats = self.encoder.forward_tokens(tokens, layout)
        return self.head(feats[:, layout.num_prefix:]), selected, kind

    def forward(self, imgs: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        logits, selected, kind = self.logits(imgs)
        target = mpp_targets(imgs.float(), self.patch, self.mean, self.std, self.bits)
        self.last = dict(logits=logits.detach(), target=target, selected=selected, kind=kind)
        return mpp_loss(logits.float(), target, selected)
