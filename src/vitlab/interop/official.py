"""Official checkpoints of the families timm does not have, read where timm's would be.

For CSwin, CvT, ScalableViT, CrossFormer, RegionViT, SepViT and ViT-5 the converter slot of
:mod:`vitlab.interop.timm` recognises the official code's keys and renames them, so
``create_model(name, pretrained_path=...)``, ``create_model(name, checkpoint_path=...)``,
``vitlab train --pretrained`` and ``load_timm_weights`` read an official ``.pth`` as it was released; a vitlab
state dict passes through unchanged.  Each family's renaming (and the key it is recognised by) lives next to
its model or in its own module here.
"""
from __future__ import annotations

from vitlab.interop.regionvit_official import regionvit_from_official
from vitlab.interop.sepvit_official import sepvit_from_official
from vitlab.interop.timm import register_official_converter
from vitlab.models.crossformer import CrossFormer, crossformer_from_official
from vitlab.models.cswin import CSwinTransformer, cswin_from_official
from vitlab.models.cvt import ConvolutionalVisionTransformer, cvt_from_official
from vitlab.models.regionvit import RegionViT
from vitlab.models.scalablevit import ScalableViT, scalablevit_from_official
from vitlab.models.sepvit import SepViT
from vitlab.models.vit5 import ViT5, vit5_from_official

__all__ = ["OFFICIAL_LAYOUTS"]


def _has(fragment: str, start: bool = True):
    """A recogniser: some key starts with (or, ``start=False``, contains) ``fragment``."""
    return lambda sd: any(k.startswith(fragment) if start else fragment in k for k in sd)


# (model class, recogniser, official -> vitlab renaming); the recogniser names a key only the official code has
OFFICIAL_LAYOUTS = (
    (CSwinTransformer, _has("stage1_conv_embed."), cswin_from_official),
    (ConvolutionalVisionTransformer, _has("stage0.patch_embed."), cvt_from_official),
    (ScalableViT, _has("patch_embeds."), scalablevit_from_official),
    (CrossFormer, _has(".downsample.reductions.", start=False), crossformer_from_official),
    (RegionViT, _has("cls_token.proj."), regionvit_from_official),  # the regional tokens' conv
    (SepViT, _has("patch_embeds."), sepvit_from_official),
    (ViT5, _has(".gamma_1", start=False), vit5_from_official),  # LayerScale as in DeiT III's official code
)
for _cls, _recognise, _rename in OFFICIAL_LAYOUTS:
    register_official_converter(_cls, _recognise, _rename)
