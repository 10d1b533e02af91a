"""SimMIM: "SimMIM: A Simple Framework for Masked Image Modeling" (Xie et al., CVPR 2022).

Built on the model contract only (reference: microsoft/SimMIM, ``models/simmim.py`` and
``data/data_simmim.py``), for every :class:`~vitlab.models.backbone.Backbone` (ViT, DeiT, CaiT,
Swin, CSwin, PVT, PVTv2):

* a random mask of ``ceil(G * G * mask_ratio)`` cells of a coarse ``G x G`` grid (32-pixel cells at
  the reference's 192 px; :func:`~vitlab.pretrain.masking.mask_patch_size` scales the cell for small
  images), upsampled to the stem's token grid;
* inside the encoder, after the stem: a learned mask token is added to every masked token.  The
  pixels under the mask are set to 0 (the data mean after normalisation) before the stem, so a
  masked token carries no pixel content and an overlapping stem (conv stem, PVTv2's 7x7 patch
  embedding) cannot leak masked pixels into its neighbours; the masked token thus holds the mask
  token plus whatever the stem adds independently of the pixels (the position table of a ViT,
  which the reference adds after its mask token too);
* the rest of the encoder runs unchanged (``forward_tokens``) on the full token map;
* one linear prediction head: a 1x1 convolution from the last stage's features to ``stride**2 *
  in_chans`` channels and a pixel shuffle by the encoder's total stride ``stride``;
* the loss is the L1 distance on the masked pixels only, ``sum(|x - x_rec| * m) / (sum(m) + 1e-5) /
  in_chans``, on the normalised input.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import UserError
from vitlab.models.backbone import Backbone
from vitlab.pretrain.masking import check_ratio, mask_patch_size, simmim_mask

__all__ = ["SimMIM", "simmim_loss", "features_to_map"]


def simmim_loss(imgs: torch.Tensor, rec: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """The reference's loss: mean L1 over masked pixels (``pixel_mask`` ``(B, 1, H, W)``, 1 = masked)."""
    per_pixel = F.l1_loss(imgs, rec, reduction="none")
    return (per_pixel * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / imgs.shape[1]


def features_to_map(features: torch.Tensor, grid) -> torch.Tensor:
    """Final features as a ``(B, C, h, w)`` map: a map stays, ``(B, P + h*w, C)`` tokens lose their
    ``P`` prefix tokens."""
    if features.ndim == 4:
        return features
    h, w = grid
    tokens = features[:, features.shape[1] - h * w:]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class SimMIM(nn.Module):
    """Encoder + linear pixel head; ``forward(imgs, epoch)`` returns the loss; ``last`` holds the
    reconstruction and the pixel mask of the latest call."""

    def __init__(self, encoder: nn.Module, name: str, img_size: int, in_chans: int, mask_ratio: float = 0.6,
                 mask_patch=None):
        super().__init__()
        if not isinstance(encoder, Backbone):
            raise UserError(f"SimMIM needs a transformer backbone with forward_stem/forward_tokens; model {name} "
                            f"is not one")
        self.encoder, self.img_size, self.in_chans = encoder, int(img_size), int(in_chans)
        self.mask_ratio = check_ratio(mask_ratio)
        with torch.no_grad():
            was = encoder.training
            tokens, layout = encoder.eval().forward_stem(torch.zeros(1, in_chans, img_size, img_size))
            encoder.train(was)
        if len(layout.grid) != 2 or img_size % layout.grid[0]:
            raise UserError(f"SimMIM: model {name}'s stem gives a {layout.grid} token grid for {img_size} px images; "
                            f"expected a square map dividing the image")
        self.stem_stride = img_size // layout.grid[0]
        self.mask_patch = mask_patch_size(img_size, self.stem_stride, mask_patch)
        self.stride = int(encoder.feature_info[-1]["reduction"])
        if img_size % self.stride:
            raise UserError(f"SimMIM: image size {img_size} is not divisible by model {name}'s total stride "
                            f"{self.stride}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, tokens.shape[-1]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, self.stride ** 2 * in_chans, kernel_size=1),
                                     nn.PixelShuffle(self.stride))
        self.last: Dict[str, torch.Tensor] = {}

    def token_mask(self, batch: int, device=None) -> torch.Tensor:
        """A fresh random mask on the stem's token grid ``(B, img/stride, img/stride)``."""
        return simmim_mask(batch, self.img_size, self.mask_patch, self.stem_stride, self.mask_ratio, device)

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        s = self.stem_stride
        return mask.repeat_interleave(s, 1).repeat_interleave(s, 2).unsqueeze(1)

    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder on ``imgs`` masked by ``mask`` (token grid), then the linear head."""
        pix = self.pixel_mask(mask).to(imgs.dtype)
        tokens, layout = self.encoder.forward_stem(imgs * (1.0 - pix))
        p = layout.num_prefix
        w = mask.flatten(1).unsqueeze(-1).to(tokens.dtype)
        grid = tokens[:, p:] + self.mask_token.to(tokens.dtype) * w
        features = self.encoder.forward_tokens(torch.cat([tokens[:, :p], grid], dim=1), layout)
        g = self.img_size // self.stride
        return self.decoder(features_to_map(features, (g, g)))

    def forward(self, imgs: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        mask = self.token_mask(imgs.shape[0], imgs.device)
        rec = self.reconstruct(imgs, mask)
        pix = self.pixel_mask(mask)
        self.last = dict(rec=rec.detach(), pixel_mask=pix)
        return simmim_loss(imgs.float(), rec.float(), pix)

