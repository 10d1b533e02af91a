"""The real CIFAR-10 images in ../shared/data/cifar10 (ImageFolder, JPEG q75) read through vitlab:
label order, counts, and decoded pixels against the files opened independently with PIL."""
import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_data_pipeline_reads_the_real_images(cifar10_root):
    from vitlab.data import build_dataset_pair

    train, val, classes = build_dataset_pair(str(cifar10_root))
    assert classes == CLASSES  # the standard CIFAR-10 label order: airplane=0 ... truck=9
    assert (len(train), len(val)) == (50_000, 10_000)
    for ds, per_class in ((train, 5000), (val, 1000)):
        counts = np.bincount([y for _, y in ds.samples], minlength=10)
        assert counts.tolist() == [per_class] * 10
    # one decoded image per split, each against the file read with PIL (no transform: a PIL image)
    for ds, split, cls, idx in ((train, "train", "ship", 1234), (val, "val", "frog", 7)):
        i = next(k for k, (p, y) in enumerate(ds.samples) if p.endswith(f"{split}/{cls}/{idx:04d}.jpg"))
        img, label = ds[i]
        assert label == CLASSES.index(cls)
        want = np.asarray(Image.open(cifar10_root / split / cls / f"{idx:04d}.jpg").convert("RGB"))
        got = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else \
            (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert want.shape == (32, 32, 3)
        assert np.array_equal(got, want)
        assert want.std() > 10  # a real photo, not a blank


def test_analyze_loader_reads_the_real_images(cifar10_root):
    from vitlab.analysis.cli import load_data

    d = load_data(str(cifar10_root), n_train=4, n_eval=6, seed=0)
    assert d.num_classes == 10 and d.eval_x.shape == (6, 3, 32, 32) and d.train_x.shape == (4, 3, 32, 32)
    ds_samples = sorted((cifar10_root / "val").glob("*/*.jpg"))
    assert len(ds_samples) == 10_000
    # every analysed image is one of the files, pixel for pixel, with its folder's label
    files = {}
    for x, y in zip(d.eval_x, d.eval_y):
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        hits = [p for p in (cifar10_root / "val" / CLASSES[int(y)]).glob("*.jpg")
                if np.array_equal(np.asarray(Image.open(p).convert("RGB")), arr)]
        assert len(hits) == 1, f"image with label {int(y)} not found in val/{CLASSES[int(y)]}"
        files[hits[0]] = int(y)
    assert len(files) == 6
    assert torch.all((d.eval_x >= 0) & (d.eval_x <= 1))
