"""What an unseen ImageFolder holds, read from a sample of its files (headers only, no decoding):
image size, channels, images and classes.  ``vitlab train --data DIR`` chooses its defaults
from this instead of assuming ImageNet's 224 pixels."""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional

__all__ = ["IMG_EXTENSIONS", "SPLIT_NAMES", "find_split", "folder_stats"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid", "test")}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _class_dirs(root: str) -> List[str]:
    return sorted(e.path for e in os.scandir(root) if e.is_dir())


def find_split(root: str, split: str) -> Optional[str]:
    """``root/<split>`` under one of its usual names (val: val, validation, valid, test), or None."""
    for name in SPLIT_NAMES[split]:
        p = os.path.join(root, name)
        if os.path.isdir(p):
            return p
    return None


def _sample_files(root: str, k: int) -> List[str]:
    per_class: List[List[str]] = []
    for d in _class_dirs(root):
        per_class.append(sorted(e.path for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)))
    files: List[str] = []
    i = 0
    while len(files) < k and any(i < len(c) for c in per_class):  # round robin over the classes
        files += [c[i] for c in per_class if i < len(c)]
        i += 1
    return files[:k]


@functools.lru_cache(maxsize=8)
def folder_stats(root: str, sample: int = 64) -> Dict[str, object]:
    """``img_size`` (median shorter side), ``in_chans`` (1 if every sampled image is grey),
    ``num_classes`` and ``num_images`` (of the train split, or of ``root`` itself)."""
    from PIL import Image

    base = find_split(root, "train") or find_split(root, "val") or root
    classes = _class_dirs(base)
    n = sum(1 for d in classes for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    sides, grey = [], True
    for path in _sample_files(base, sample):
        try:
            with Image.open(path) as im:  # reads the header only
                sides.append(min(im.size))
                grey = grey and im.mode in _GREY_MODES
        except Exception:  # a broken file is reported when it is read for training
            continue
    sides.sort()
    return dict(img_size=sides[len(sides) // 2] if sides else 224, in_chans=1 if sides and grey else 3,
                num_classes=len(classes), num_images=n)
