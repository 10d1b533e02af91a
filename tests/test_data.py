"""Data sets, transforms and resumable samplers (vitlab.data)."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import UserError
from vitlab.data import (BrokenImageError, BundledDigits, EpochSampler, SeededTransform, build_dataset_pair,
                         build_eval_transform, build_train_loader, build_train_transform)


def make_folder(root, classes=("a", "b"), per_class=3, size=8, splits=("train", "val")):
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = np.full((size, size, 3), 40 * ci + 10 * i, dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_bundled_digits_split_is_fixed_stratified_and_complete():
    from sklearn.model_selection import train_test_split

    from vitlab.data.datasets import _digits_arrays

    tr, va = BundledDigits("train"), BundledDigits("val")
    assert (len(tr), len(va)) == (4000, 1000)
    assert np.bincount(tr.targets).tolist() == [400] * 10 and np.bincount(va.targets).tolist() == [100] * 10
    x, y, _, _ = _digits_arrays(0)
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and np.bincount(y).tolist() == [500] * 10
    # the documented split: sklearn's stratified train_test_split(test_size=1000, random_state=0), sorted
    _, idx_val = train_test_split(np.arange(5000), test_size=1000, stratify=y, random_state=0)
    idx_val = np.sort(idx_val)
    idx_train = np.setdiff1d(np.arange(5000), idx_val)
    assert np.array_equal(va.images, x[idx_val]) and va.targets == y[idx_val].tolist()
    assert np.array_equal(tr.images, x[idx_train]) and tr.targets == y[idx_train].tolist()
    img, t = tr[5]
    assert img.mode == "L" and img.size == (28, 28) and np.array_equal(np.asarray(img), x[idx_train[5]])


def test_imagefolder_streams_and_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root = make_folder(tmp_path)
    tr, va, classes = build_dataset_pair(str(root))
    ref = ImageFolder(str(root / "train"))
    assert classes == ref.classes and tr.targets == ref.targets and len(va) == 6
    for i in range(len(ref)):
        assert np.array_equal(np.asarray(tr[i][0].convert("RGB")), np.asarray(ref[i][0]))


@pytest.mark.parametrize("case", ["missing", "file", "no_val", "empty_class", "val_classes"])
def test_imagefolder_user_errors_are_one_line(tmp_path, case):
    root = make_folder(tmp_path / "d")
    if case == "missing":
        path, want = str(tmp_path / "nope"), "neither"
    elif case == "file":
        (tmp_path / "f.txt").write_text("x")
        path, want = str(tmp_path / "f.txt"), "is a file"
    elif case == "no_val":
        import shutil
        shutil.rmtree(root / "val")
        path, want = str(root), "no val/ folder"
    elif case == "empty_class":
        (root / "train" / "c").mkdir()
        path, want = str(root), os.path.join("train", "c")
    else:
        import shutil
        shutil.rmtree(root / "val" / "b")
        path, want = str(root), "differ from the training classes"
    with pytest.raises(UserError) as e:
        build_dataset_pair(path)
    assert want in str(e.value) and "\n" not in str(e.value)


def test_broken_image_named_or_skipped(tmp_path):
    root = make_folder(tmp_path)
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"not a png")
    tr, _, _ = build_dataset_pair(str(root))
    idx = [i for i, (p, _) in enumerate(tr.samples) if p == str(bad)][0]
    with pytest.raises(BrokenImageError, match=str(bad)):
        tr[idx]
    tr, _, _ = build_dataset_pair(str(root), skip_broken=True)
    with pytest.warns(UserWarning, match=str(bad)):
        img, t = tr[idx]
    # replaced by the next sample in the index
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(tr.samples[idx + 1][0])))
    assert t == tr.samples[idx + 1][1]


def _write_cifar(root, n_train_per_batch=4, n_test=5, hundred=False):
    rng = np.random.default_rng(0)
    if hundred:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        arrays = {}
        for name, n in (("train", 10), ("test", n_test)):
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = rng.integers(0, 100, n).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
            arrays[name] = (data, labels)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
        return arrays
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {"train": ([], [])}
    for b in range(1, 6):
        data = rng.integers(0, 256, (n_train_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_train_per_batch).tolist()
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        arrays["train"][0].append(data)
        arrays["train"][1].extend(labels)
    arrays["train"] = (np.concatenate(arrays["train"][0]), arrays["train"][1])
    data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n_test).tolist()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    arrays["test"] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"k{i}" for i in range(10)]}, f)
    return arrays


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles_through_torchvision(tmp_path, hundred):
    arrays = _write_cifar(tmp_path, hundred=hundred)
    tr, va, classes = build_dataset_pair("cifar100" if hundred else "cifar10", data_dir=str(tmp_path))
    assert len(classes) == (100 if hundred else 10)
    for ds, (data, labels) in ((tr, arrays["train"]), (va, arrays["test"])):
        assert len(ds) == len(labels)
        for i in (0, len(labels) - 1):
            img, t = ds[i]
            # CIFAR rows are 1024 red, 1024 green, 1024 blue values in row-major order
            want = data[i].reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(np.asarray(img), want) and t == labels[i]


def test_cifar_missing_offline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cifar10 not found"):
        build_dataset_pair("cifar10", data_dir=str(tmp_path))


def test_eval_transform_is_plain_normalisation():
    arr = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    t = build_eval_transform(28, 1, (0.1307,), (0.3081,), crop_pct=1.0)
    out = t(Image.fromarray(arr, mode="L"))
    want = (torch.from_numpy(arr).float() / 255 - 0.1307) / 0.3081
    assert out.shape == (1, 28, 28) and torch.allclose(out[0], want, atol=1e-6)
    # a grey image for a 3-channel model is replicated into 3 channels
    out3 = build_eval_transform(28, 3, (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)(Image.fromarray(arr, mode="L"))
    assert out3.shape == (3, 28, 28) and torch.equal(out3[0], out3[2])


def test_bad_transform_values_are_named():
    with pytest.raises(ValueError, match="hflip"):
        build_train_transform(32, 3, (0.5,) * 3, (0.5,) * 3, hflip=1.5)
    with pytest.raises(ValueError, match="crop"):
        build_train_transform(32, 3, (0.5,) * 3, (0.5,) * 3, crop="zoom")


def test_epoch_sampler_order_shards_and_resume_position():
    n = 23
    single = EpochSampler(n, seed=3)
    single.set_epoch(2)
    order = [i for _, _, i in single]
    # DistributedSampler semantics: randperm seeded with seed + epoch
    assert order == torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    single.set_epoch(3)
    assert [i for _, _, i in single] != order
    # two ranks interleave the same permutation (padded by wrapping)
    ranks = []
    for r in range(2):
        s = EpochSampler(n, world_size=2, rank=r, seed=3)
        s.set_epoch(2)
        ranks.append([i for _, _, i in s])
    padded = order + order[:1]
    assert ranks[0] == padded[0::2] and ranks[1] == padded[1::2]
    # starting mid-epoch yields exactly the remaining samples, once; the next epoch is whole
    single.set_position(2, 10)
    assert [i for _, _, i in single] == order[10:]
    assert len(list(single)) == n


def test_seeded_transform_reproducible_and_leaves_global_rng_alone():
    tf = build_train_transform(16, 3, (0.5,) * 3, (0.5,) * 3, crop="rrc", randaug="rand-m9-mstd0.5-inc1",
                               reprob=0.5)
    st = SeededTransform(tf, seed=1)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    torch.manual_seed(7)
    random.seed(7)
    a = st(img, 0, 5)
    after = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    ref = (torch.rand(3), random.random())
    assert torch.equal(after[0], ref[0]) and after[1] == ref[1]
    assert torch.equal(st(img, 0, 5), a)
    assert not torch.equal(st(img, 1, 5), a) or not torch.equal(st(img, 0, 6), a)


def test_train_loader_same_batches_with_workers(tmp_path):
    root = make_folder(tmp_path, per_class=4, size=12)
    tr, _, _ = build_dataset_pair(str(root))
    tf = build_train_transform(8, 3, (0.5,) * 3, (0.5,) * 3, crop="rrc")
    batches = []
    for w in (0, 2):
        loader = build_train_loader(tr, tf, batch_size=3, seed=0, workers=w)
        loader.sampler.set_epoch(1)
        batches.append([(x, y) for x, y in loader])
    assert len(batches[0]) == 3
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_repeated_augmentation_sampler_repeats_with_distinct_draws():
    n, world = 12, 2
    ranks = []
    for r in range(world):
        s = EpochSampler(n, world_size=world, rank=r, seed=0, repeats=3)
        s.set_epoch(0)
        ranks.append(list(s))
    # timm's RepeatAugSampler (DeiT): each rank keeps ~n/world draws per epoch, taken from the
    # list in which every image appears 3 times in a row; every draw has its own augmentation key
    assert all(len(r) == n // world for r in ranks)
    keys = [k for r in ranks for _, k, _ in r]
    assert len(set(keys)) == len(keys)
    g = torch.Generator()
    from vitlab.data.loader import _mix

    g.manual_seed(_mix(0, 0) % 2 ** 31)  # the (seed, epoch) mix handed to timm's sampler as its epoch
    repeated = torch.randperm(n, generator=g).repeat_interleave(3).tolist()
    for r in range(world):
        assert [i for _, _, i in ranks[r]] == repeated[r::world][: n // world]


def test_augmentation_of_a_sample_changes_with_the_epoch_and_not_with_workers(tmp_path):
    """The seed of a sample's augmentation is (seed, epoch, key): the same epoch replays exactly
    (also with a worker process); the next epoch draws new crops for (almost) every sample."""
    from conftest import brightness_folder

    from vitlab.data import StreamingImageFolder

    tr = StreamingImageFolder(brightness_folder(tmp_path, {"train": (8, 8)}, seed=0, noise=40, size=16) + "/train")
    tf = build_train_transform(12, 3, [0.5] * 3, [0.5] * 3, crop="rrc", hflip=0.5)

    def epoch_batches(epoch, workers):
        loader = build_train_loader(tr, tf, batch_size=16, seed=3, workers=workers)
        loader.sampler.set_position(epoch, 0)
        return {k: x for (_, k, _), x in zip(list(loader.sampler), next(iter(loader))[0])}

    e0, e0_again, e0_worker, e1 = (epoch_batches(0, 0), epoch_batches(0, 0), epoch_batches(0, 1),
                                   epoch_batches(1, 0))
    assert all(torch.equal(e0[k], e0_again[k]) and torch.equal(e0[k], e0_worker[k]) for k in e0)
    assert sum(torch.equal(e0[k], e1[k]) for k in e0) <= 2
