"""Folders of clips (video or volumes) for the 3-D models: ``ClipFolder`` and its transforms.

A clip folder is an ImageFolder whose items are clips instead of images::

    root/train/<class>/<clip>.npy          a volume or video: (T, H, W) grey, or (T, H, W, C) with C = 1 or 3
    root/train/<class>/<clip>/<frame>.png  a folder of frames (any image format), in file-name order

Clips are returned as ``torchvision.tv_tensors.Video`` ``(T, C, H, W)``, so torchvision's v2 transforms apply
one crop / flip to every frame; :func:`build_clip_transform` samples ``num_frames`` uniformly in time
(``UniformTemporalSubsample``, as ViViT's uniform frame sampling, sec. 3.2), crops, normalises and returns
``(C, T, H, W)``, the layout of :class:`vitlab.models.video.VideoViT`.  ``.npy`` files are read with
``allow_pickle=False``; uint8 arrays are scaled to [0, 1], float arrays are taken as intensities in [0, 1].
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vitlab.data.folder_info import IMG_EXTENSIONS, find_split
from vitlab.errors import UserError

__all__ = ["ClipFolder", "is_clip_folder", "clip_stats", "build_clip_transform"]


def _items(class_dir: str) -> List[str]:
    return sorted(e.path for e in os.scandir(class_dir)
                  if (e.is_file() and e.name.lower().endswith(".npy")) or e.is_dir())


def is_clip_folder(root: str) -> bool:
    """True when the (train) split's first class folder holds ``.npy`` files or frame folders."""
    base = find_split(root, "train") or find_split(root, "val") or root
    classes = sorted(e.path for e in os.scandir(base) if e.is_dir()) if os.path.isdir(base) else []
    return bool(classes) and bool(_items(classes[0]))


def _load_npy(path: str) -> torch.Tensor:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read clip {path}: {str(exc).splitlines()[0]}") from None
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise UserError(f"clip {path} has shape {a.shape}; expected (T, H, W) or (T, H, W, C) with C = 1 or 3")
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    return t if t.dtype == torch.uint8 else t.float()


def _load_frames(path: str) -> torch.Tensor:
    from PIL import Image

    frames = sorted(e.path for e in os.scandir(path) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    if not frames:
        raise UserError(f"clip folder {path} holds no frame images ({', '.join(IMG_EXTENSIONS)})")
    try:
        with Image.open(frames[0]) as first:
            mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        arrays = []
        for f in frames:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert(mode)))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read the frames of {path}: {str(exc).splitlines()[0]}") from None
    a = np.stack(arrays)
    return torch.from_numpy(a[..., None] if a.ndim == 3 else a).permute(0, 3, 1, 2).contiguous()


class ClipFolder(Dataset):
    """``(Video (T, C, H, W), label)`` for every clip of ``root/<class>/``; ``classes`` (e.g. the training
    split's) must match the folder's class names."""

    def __init__(self, root: str, classes: Optional[List[str]] = None):
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not found:
            raise UserError(f"no class folders in {root} (expected {root}/<class>/<clips>)")
        if classes is not None and list(classes) != found:
            raise UserError(f"class folders of {root} differ from the training classes: {found} vs {list(classes)}")
        self.root, self.classes = root, found
        self.samples: List[Tuple[str, int]] = []
        for i, c in enumerate(found):
            items = _items(os.path.join(root, c))
            if not items:
                raise UserError(f"class folder {os.path.join(root, c)} holds no clips (.npy files or frame folders)")
            self.samples += [(p, i) for p in items]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors

        path, label = self.samples[i]
        clip = _load_npy(path) if path.endswith(".npy") else _load_frames(path)
        return tv_tensors.Video(clip), label


def clip_stats(root: str) -> Dict[str, object]:
    """Size facts of a clip folder from its first clip: frames, shorter side, channels, clips and classes."""
    base = find_split(root, "train") or find_split(root, "val") or root
    ds = ClipFolder(base)
    clip, _ = ds[0]
    t, c, h, w = clip.shape
    return dict(num_frames=int(t), img_size=int(min(h, w)), in_chans=int(c), num_images=len(ds),
                num_classes=len(ds.classes))


class _ToCTHW:
    """Video ``(T, C, H, W)`` -> a plain ``(C, T, H, W)`` tensor (the video models' input)."""

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return v.as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()

    def __repr__(self) -> str:
        return "ToCTHW()"


class _ToFloat:
    """uint8 frames scaled to [0, 1]; float clips kept (already intensities)."""

    def __call__(self, v):
        from torchvision import tv_tensors

        return tv_tensors.wrap(v.float() / 255.0, like=v) if v.dtype == torch.uint8 else v


def build_clip_transform(num_frames: int, img_size: int, mean: Sequence[float], std: Sequence[float],
                         train: bool, hflip: float = 0.5, scale_min: float = 0.08, crop_pct: float = 1.0):
    """Uniform temporal sampling of ``num_frames``, then (train) a random resized crop and flip shared by
    every frame, or (eval) resize + centre crop; [0, 1] scaling and per-channel normalisation."""
    from torchvision.transforms import v2

    t = [v2.UniformTemporalSubsample(num_frames), _ToFloat()]
    if train:
        t.append(v2.RandomResizedCrop(img_size, scale=(scale_min, 1.0), antialias=True))
        if hflip > 0:
            t.append(v2.RandomHorizontalFlip(hflip))
    else:
        size = int(round(img_size / crop_pct)) if crop_pct < 1.0 else img_size
        t += [v2.Resize(size, antialias=True), v2.CenterCrop(img_size)]
    return v2.Compose(t + [v2.Normalize(list(mean), list(std)), _ToCTHW()])
