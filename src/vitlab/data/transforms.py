"""Train / eval transforms from torchvision transforms v2 and timm's data utilities.

* random resized crop ("Going Deeper with Convolutions", Szegedy et al., 2015) or pad+crop,
  horizontal flip;
* RandAugment ("RandAugment: Practical automated data augmentation with a reduced search
  space", Cubuk et al., 2020) through timm's ``rand_augment_transform`` (config strings such as
  DeiT's ``rand-m9-mstd0.5-inc1``);
* random erasing ("Random Erasing Data Augmentation", Zhong et al., AAAI 2020) through timm's
  ``RandomErasing`` (per-pixel noise, as in DeiT);
* Mixup / CutMix are batch-level and live in the train loop (timm's ``Mixup``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

__all__ = ["build_train_transform", "build_eval_transform", "ToMode"]

CROPS = ("rrc", "pad", "affine", "none")


class ToMode:
    """Convert a PIL image to ``"L"`` (1 channel) or ``"RGB"`` (3 channels)."""

    def __init__(self, in_chans: int):
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3 for image data, got {in_chans}")
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def _to_tensor(mean: Sequence[float], std: Sequence[float]):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_train_transform(img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                          crop: str = "rrc", scale_min: float = 0.08, padding: int = 4, hflip: float = 0.5,
                          randaug: Optional[str] = None, reprob: float = 0.0, interpolation: str = "bicubic",
                          color_jitter: float = 0.0, degrees: float = 10.0, scale_jitter: float = 0.1):
    """The training pipeline (PIL image in, normalised float tensor out).  ``crop="affine"``: a
    random rotation (+-``degrees``), shift (+-``padding`` pixels) and zoom (1 +- ``scale_jitter``),
    the classic augmentation for digits and other centred small images."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    if not 0.0 <= reprob <= 1.0:
        raise ValueError(f"reprob (random erasing probability) must be in [0, 1], got {reprob!r}")
    if not 0.0 < scale_min <= 1.0:
        raise ValueError(f"scale_min must be in (0, 1], got {scale_min!r}")
    interp = v2.InterpolationMode(interpolation)
    t = [ToMode(in_chans)]
    if crop == "rrc":
        t.append(v2.RandomResizedCrop(img_size, scale=(scale_min, 1.0), interpolation=interp, antialias=True))
    else:
        t += [v2.Resize(img_size, interpolation=interp, antialias=True), v2.CenterCrop(img_size)]
        if crop == "pad" and padding > 0:
            t.append(v2.RandomCrop(img_size, padding=padding))
        elif crop == "affine":
            shift = padding / img_size
            t.append(v2.RandomAffine(degrees=degrees, translate=(shift, shift),
                                     scale=(1 - scale_jitter, 1 + scale_jitter), interpolation=v2.InterpolationMode.BILINEAR))
    if hflip > 0:
        t.append(v2.RandomHorizontalFlip(hflip))
    if randaug:
        from timm.data.auto_augment import rand_augment_transform

        if not randaug.startswith("rand"):
            raise ValueError(f"randaug must be a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', got {randaug!r}")
        fill = tuple(round(255 * m) for m in mean)
        t.append(rand_augment_transform(randaug, dict(translate_const=int(img_size * 0.45),
                                                      img_mean=fill if in_chans == 3 else fill[0])))
    elif color_jitter:  # timm applies colour jitter only without RandAugment
        t.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    t += _to_tensor(mean, std)
    if reprob > 0:
        from timm.data.random_erasing import RandomErasing

        t.append(RandomErasing(reprob, mode="pixel", device="cpu"))
    return v2.Compose(t)


def build_eval_transform(img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                         crop_pct: float = 0.875, interpolation: str = "bicubic"):
    """Resize the short side to ``img_size / crop_pct`` and centre-crop ``img_size`` (timm/DeiT eval)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    interp = v2.InterpolationMode(interpolation)
    size = int(round(img_size / crop_pct)) if crop_pct < 1.0 else img_size
    return v2.Compose([ToMode(in_chans), v2.Resize(size, interpolation=interp, antialias=True),
                       v2.CenterCrop(img_size), *_to_tensor(mean, std)])
