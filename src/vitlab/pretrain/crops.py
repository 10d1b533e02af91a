"""DINO's multi-crop augmentation (``DataAugmentationDINO`` of facebookresearch/dino) with
torchvision transforms v2, scaled to the image size.

Two global crops (random resized crop, area ``global_scale``, at the training size) and
``local_crops`` local ones (area ``local_scale``, at ``local_size``); each gets a flip and colour
jitter (p = 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 on colour images; brightness
and contrast on grey ones), random grey (p = 0.2, colour only), a Gaussian blur (p = 1.0 and 0.1 on the
global crops, 0.5 on the local ones; radius 0.1-2 px at 224 px, scaled by ``size / 224``) and, on the
second global crop, solarisation (p = 0.2).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2

from vitlab.data.transforms import ToMode
from vitlab.errors import UserError

__all__ = ["MultiCrop", "default_local_size"]


def default_local_size(img_size: int, stride: int) -> int:
    """The reference's 96 px for 224 px global crops, scaled and rounded to a multiple of ``stride``."""
    return max(stride, int(round(img_size * 96 / 224 / stride)) * stride)


def _blur(size: int, p: float):
    sigma = (0.1 * size / 224, 2.0 * size / 224)
    k = 2 * int(3 * sigma[1] + 0.5) + 1
    blur = v2.GaussianBlur(kernel_size=max(3, k), sigma=sigma)
    return v2.RandomApply([blur], p=p)


class MultiCrop:
    """``image -> [global_1, global_2, local_1, ..., local_n]`` normalised tensors."""

    def __init__(self, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float], local_crops: int = 6,
                 local_size: Optional[int] = None, global_scale: Tuple[float, float] = (0.4, 1.0),
                 local_scale: Tuple[float, float] = (0.05, 0.4), hflip: float = 0.5):
        local_size = int(local_size or img_size)
        if local_crops < 0:
            raise UserError(f"--local-crops {local_crops}: expected a count >= 0")
        if local_crops and local_size > img_size:  # equal: vit-pytorch's local crops resized to the global size
            raise UserError(f"--local-size {local_size}: local crops must not be larger than the {img_size} px "
                            f"global crops")
        for flag, (lo, hi) in (("--global-scale", global_scale), ("--local-scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise UserError(f"{flag} {lo},{hi}: expected 0 < min <= max <= 1 (fractions of the image area)")
        self.local_crops, self.local_size = local_crops, local_size
        grey = in_chans == 1
        jitter = v2.ColorJitter(0.4, 0.4) if grey else v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
        common = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
        common.append(v2.RandomApply([jitter], p=0.8))
        if not grey:
            common.append(v2.RandomGrayscale(p=0.2))
        norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        interp = v2.InterpolationMode.BICUBIC

        def crop(size, scale):
            return [ToMode(in_chans), v2.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True)]

        self.global1 = v2.Compose(crop(img_size, global_scale) + common + [_blur(img_size, 1.0)] + norm)
        self.global2 = v2.Compose(crop(img_size, global_scale) + common + [_blur(img_size, 0.1),
                                                                          v2.RandomSolarize(128, p=0.2)] + norm)
        self.local = v2.Compose(crop(local_size, local_scale) + common + [_blur(local_size, 0.5)] + norm)

    def __call__(self, img) -> List[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_crops)]
