"""`vitlab train` / `vitlab eval` on NaViT ("Patch n' Pack", Dehghani et al., NeurIPS 2023): an ImageFolder of
mixed-size images is trained and evaluated at native sizes, packed by the collate (vitlab.data.packing).

Checked against independent computations: images rebuilt from the packed tokens by hand vs the PNGs read by
hand (every image once per epoch, none resized that fits), NLL of the final evaluation vs each image run alone
through the unpacked path, accumulation vs the big batch under SGD, a resumed run vs an uninterrupted one."""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.engine import TrainConfig, train
from vitlab.engine.build import build_data

SMALL = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, max_len=24)
SIZES = [(8, 12), (16, 8), (10, 18), (20, 16)]  # (H, W); 10 x 18 is cropped to 8 x 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 PNGs (16 train, 8 val), 4 sizes, 2 classes (dark / light noise, learnable in a few steps)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for i in range(n):
            c, (h, w) = i % 2, SIZES[(i // 2) % 4]
            d = root / split / ("dark", "light")[c]
            d.mkdir(parents=True, exist_ok=True)
            arr = np.clip((60, 190)[c] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return str(root)


def navit_cfg(data, out, **kw):
    cfg = TrainConfig(model="navit_tiny_patch4", model_kwargs=dict(SMALL), data=data, out=str(out), epochs=1,
                      batch_size=4, lr=2e-3, warmup_epochs=0, progress=False, threads=1, workers=0, amp="none",
                      hflip=0.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _by_hand(path, mean, std, patch=4, flip=False):
    """A PNG read with PIL, centre-cropped to multiples of the patch, normalised: (C, H, W)."""
    a = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    h, w = a.shape[1:]
    ch, cw = h - h % patch, w - w % patch
    a = a[:, (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    a = a.flip(-1) if flip else a
    return (a - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _unpack(batch, patch=4, chans=3):
    """Each image of a PackedBatch rebuilt from its tokens: (ph, pw, C) patches placed at (row, column)."""
    out = []
    for i, (h, w) in enumerate(batch.grids):
        s, slot = batch.index[i].tolist()
        own = batch.image_ids[s] == slot
        img = torch.full((chans, h * patch, w * patch), float("nan"))
        for tok, (r, c) in zip(batch.patches[s][own], batch.positions[s][own].tolist()):
            rows, cols = slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch)
            img[:, rows, cols] = tok.reshape(patch, patch, chans).permute(2, 0, 1)
        out.append(img)
    return out


def _epoch(loader, epoch):
    loader.sampler.set_position(epoch, 0)
    return list(loader)


def _match(images, labels, files, mean, std, flip=False, dropped=False):
    """Index into ``files`` of each rebuilt image (asserting its label and its pixels: all of them, or the kept
    tokens' with ``dropped``), by brute force."""
    expected = [_by_hand(f, mean, std, flip=flip) for f in files]
    found = []
    for img, y in zip(images, labels.tolist()):
        kept = ~img.isnan()
        assert dropped or kept.all()
        hits = [j for j, e in enumerate(expected)
                if e.shape == img.shape and torch.allclose(e[kept], img[kept], atol=1e-6)]
        assert len(hits) == 1, (img.shape, hits)
        assert ("dark", "light")[y] == os.path.basename(os.path.dirname(files[hits[0]]))
        found.append(hits[0])
    return found


def test_packed_loader_yields_every_image_once_at_its_own_size(folder, tmp_path):
    data = build_data(navit_cfg(folder, tmp_path, batch_size=3), 1, 0, False)
    assert data.settings["packing"] == dict(patch_size=4, max_len=24, max_img_size=[64, 64], token_drop=0.0)
    files = sorted(glob.glob(os.path.join(folder, "train", "*", "*.png")))
    mean, std = data.settings["mean"], data.settings["std"]
    for epoch in (0, 1):
        seen, sequences = [], 0
        for batch, labels in _epoch(data.train_loader, epoch):
            assert batch.num_images == len(labels) <= 3 and bool((batch.image_ids >= 0).any(-1).all())
            sequences += batch.patches.shape[0]
            seen += _match(_unpack(batch), labels, files, mean, std)
        assert sorted(seen) == list(range(16))  # every image once, none resized (cropped to the patch only)
        assert sequences < 16  # several images share a sequence of 24 tokens
    assert seen != sorted(seen)  # shuffled
    # the evaluation loader: the same images, unaugmented, in data-set order
    val_files = sorted(glob.glob(os.path.join(folder, "val", "*", "*.png")))
    seen = [j for b, y in data.val_loader for j in _match(_unpack(b), y, val_files, mean, std)]
    assert seen == list(range(8))


def test_flip_and_random_resize_are_seeded_per_image_and_keep_to_the_limits(folder, tmp_path):
    cfg = navit_cfg(folder, tmp_path, batch_size=4, hflip=1.0)
    data = build_data(cfg, 1, 0, False)
    files = sorted(glob.glob(os.path.join(folder, "train", "*", "*.png")))
    flipped = [j for b, y in _epoch(data.train_loader, 0)
               for j in _match(_unpack(b), y, files, data.settings["mean"], data.settings["std"], flip=True)]
    assert sorted(flipped) == list(range(16))
    cfg = navit_cfg(folder, tmp_path, batch_size=4, hflip=0.5, crop="rrc", scale_min=0.25,
                    model_kwargs=dict(SMALL, max_img_size=16, max_len=12))
    a = build_data(cfg, 1, 0, False).train_loader
    cfg.workers = 1
    b = build_data(cfg, 1, 0, False).train_loader
    grids = set()
    for (pa, ya), (pb, yb) in zip(_epoch(a, 1), _epoch(b, 1)):  # no dependence on the worker processes
        assert torch.equal(pa.patches, pb.patches) and torch.equal(ya, yb) and pa.grids == pb.grids
        assert all(h <= 4 and w <= 4 and h * w <= 12 for h, w in pa.grids)  # tables of 16 px, 12 tokens
        grids |= set(pa.grids)
    assert len(grids) > 4  # random sizes, not one per original size
    assert [x.grids for x, _ in _epoch(a, 0)] != [x.grids for x, _ in _epoch(a, 1)]  # redrawn every epoch


def test_token_drop_keeps_a_seeded_subset_of_each_images_own_patches(folder, tmp_path):
    cfg = navit_cfg(folder, tmp_path, model_kwargs=dict(SMALL, token_drop=0.5))
    data = build_data(cfg, 1, 0, False)
    files = sorted(glob.glob(os.path.join(folder, "train", "*", "*.png")))
    mean, std = data.settings["mean"], data.settings["std"]
    epoch0 = _epoch(data.train_loader, 0)
    seen = []
    for batch, labels in epoch0:
        for (h, w), img in zip(batch.grids, _unpack(batch)):  # NaViT sec. 2.2: round(n (1 - rate)) tokens kept
            assert int((~img[0, ::4, ::4].isnan()).sum()) == round(h * w * 0.5)
        seen += _match(_unpack(batch), labels, files, mean, std, dropped=True)
    assert sorted(seen) == list(range(16))
    cfg.workers = 1
    again = _epoch(build_data(cfg, 1, 0, False).train_loader, 0)
    assert all(torch.equal(a.image_ids, b.image_ids) and torch.equal(a.patches, b.patches)
               for (a, _), (b, _) in zip(epoch0, again))  # seeded per image, not per worker or batch
    epoch1 = _epoch(data.train_loader, 1)
    kept = lambda ep: sorted(str(b.positions[b.image_ids >= 0].tolist()) for b, _ in ep)  # noqa: E731
    assert kept(epoch0) != kept(epoch1)
    for batch, _ in data.val_loader:  # evaluation drops nothing
        assert all(not img.isnan().any() for img in _unpack(batch))


def test_native_size_transform_resizes_only_what_exceeds_the_tables_or_the_tokens():
    from vitlab.data.packing import native_size_transform

    tf = native_size_transform(4, (0.5,) * 3, (0.25,) * 3, max_size=(16, 24), max_tokens=12)
    for h, w in [(8, 12), (13, 9), (16, 8), (100, 20), (20, 16), (12, 40), (4, 4)]:
        img = Image.fromarray(np.zeros((h, w, 3), np.uint8))
        out = tf(img)
        fits = h <= 16 and w <= 24 and (h // 4) * (w // 4) <= 12
        if fits:
            assert tuple(out.shape[1:]) == (h - h % 4, w - w % 4)
        else:
            gh, gw = out.shape[1] // 4, out.shape[2] // 4
            assert out.shape[1] <= 16 and out.shape[2] <= 24 and gh * gw <= 12
            assert abs(math.log(out.shape[1] / out.shape[2]) - math.log(h / w)) < 0.7  # aspect about kept
        torch.testing.assert_close(out, torch.full_like(out, -2.0))  # (0 - 0.5) / 0.25


def test_train_then_eval_give_the_same_metrics_as_each_image_alone(folder, tmp_path, capsys):
    from vitlab.cli import main

    out = tmp_path / "run"
    summary = train(navit_cfg(folder, out, epochs=2, hflip=0.5, ema=True, ema_decay=0.5))
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    # independent: every val image alone through the unpacked (B, C, H, W) path, at its own size
    m = vitlab.create_model("navit_tiny_patch4", **SMALL, num_classes=2)
    m.load_state_dict(ck["model"])
    m.eval()
    files = sorted(glob.glob(os.path.join(folder, "val", "*", "*.png")))
    with torch.no_grad():
        p = torch.cat([m(_by_hand(f, ck["data"]["mean"], ck["data"]["std"])[None]).softmax(-1) for f in files])
    y = torch.tensor([("dark", "light").index(os.path.basename(os.path.dirname(f))) for f in files])
    assert summary["nll"] == pytest.approx(-p[torch.arange(8), y].log().mean().item(), rel=1e-5)
    assert summary["top1"] == pytest.approx(100 * (p.argmax(1) == y).double().mean().item())
    # vitlab eval: the run's own batches (8 = 2 x batch size) give the same numbers exactly, others within rounding
    ckpt = str(out / "checkpoints" / "last.pt")
    assert main(["eval", "--checkpoint", ckpt, "--amp", "none", "--batch-size", "8", "--out", str(tmp_path / "e")]) == 0
    ev = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert (ev["nll"], ev["top1"], ev["ece"]) == (summary["nll"], summary["top1"], summary["ece"])
    assert main(["eval", "--checkpoint", ckpt, "--amp", "none", "--batch-size", "3", "--out", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["nll"] == pytest.approx(summary["nll"], rel=1e-5)
    assert main(["eval", "--checkpoint", ckpt, "--amp", "none", "--ema", "--out", str(tmp_path / "g")]) == 0
    ema = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert ema["top1"] == summary["ema_top1"] and ema["nll"] != ev["nll"]
    assert "native sizes (packed)" in capsys.readouterr().out


def test_gradient_accumulation_over_packed_batches_equals_the_big_batch(folder, tmp_path):
    sgd = dict(opt="momentum", momentum=0.0, weight_decay=0.0, sched="constant", lr=0.5, smoothing=0.0)
    train(navit_cfg(folder, tmp_path / "a", batch_size=8, accum_steps=1, **sgd))
    train(navit_cfg(folder, tmp_path / "b", batch_size=4, accum_steps=2, **sgd))
    train(navit_cfg(folder, tmp_path / "c", batch_size=4, accum_steps=1, **sgd))
    wa, wb, wc = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in "abc")
    for k in wa:  # the loss is a mean over images, not over sequences or tokens
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) > 1e-3


def test_resume_mid_epoch_equals_the_uninterrupted_run(folder, tmp_path):
    kw = dict(epochs=2, batch_size=2, accum_steps=2, hflip=0.5, crop="rrc", scale_min=0.3, ema=True,
              ema_decay=0.9, drop_path=0.1, amp="bf16", warmup_epochs=0.5, model_kwargs=dict(SMALL, token_drop=0.25))
    ref = train(navit_cfg(folder, tmp_path / "ref", **kw))
    train(navit_cfg(folder, tmp_path / "cut", max_steps=3, **kw))  # 4 steps per epoch: stops inside epoch 0
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (cut["epoch"], cut["step"]) == (0, 3)
    res = train(navit_cfg(folder, tmp_path / "res", resume=str(tmp_path / "cut" / "checkpoints" / "last.pt"), **kw))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True) for r in ("ref", "res"))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert (res["top1"], res["nll"], res["ece"]) == (ref["top1"], ref["nll"], ref["ece"])
    assert math.isfinite(ref["nll"]) and a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


@pytest.mark.parametrize("flags, needle", [
    (["--mixup", "0.8"], "--mixup"), (["--cutmix", "1"], "--cutmix"), (["--channels-last"], "--channels-last"),
    (["--crop", "pad"], "--crop pad"), (["--randaug", "rand-m9-mstd0.5"], "--randaug"),
])
def test_flags_that_need_one_image_size_are_one_line_errors(folder, tmp_path, flags, needle, capsys):
    from vitlab.cli import main

    assert main(["train", "--model", "navit_tiny_patch4", "--data", folder, "--out", str(tmp_path / "x"),
                 "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "navit_tiny_patch4" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_distill_is_refused_for_a_packing_student(folder, tmp_path, capsys):
    from vitlab.cli import main

    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"")  # never read: the refusal comes first
    assert main(["train", "--model", "navit_tiny_patch4", "--data", folder, "--distill", "hard", "--teacher",
                 str(teacher), "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--distill" in err and "\n" not in err
