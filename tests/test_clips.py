"""Folders of clips (.npy volumes, frame folders) through the data path, `vitlab train` and `vitlab eval`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.data import build_dataset_pair, dataset_info
from vitlab.data.clips import ClipFolder, build_clip_transform
from vitlab.errors import UserError

ARGS = ["--model", "vit3d_small_patch16", "--model-kwargs",
        "embed_dim=16,depth=1,num_heads=2,patch_size=4,tubelet_size=2,num_frames=4", "--img-size", "8",
        "--epochs", "1", "--batch-size", "4", "--lr", "5e-3", "--warmup-epochs", "0", "--threads", "1",
        "--no-progress", "--amp", "none", "--crop-pct", "1", "--workers", "0"]


def npy_clips(root, counts=(6, 4), frames=8, size=12, seed=0):
    """class ``dark`` / ``bright`` grey volumes ``(T, H, W)`` uint8 in train/ and val/."""
    g = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), counts):
        for c, level in (("bright", 180), ("dark", 60)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(level + g.normal(0, 20, (frames, size, size)), 0, 255).astype(np.uint8)
                np.save(d / f"clip{i}.npy", a)
    return str(root)


def test_clip_folder_reads_volumes_and_frame_folders_in_order(tmp_path):
    vol = np.arange(5 * 4 * 6, dtype=np.uint8).reshape(5, 4, 6)
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "v.npy", vol)
    frames = tmp_path / "a" / "w"
    frames.mkdir()
    for t in (2, 0, 1):  # written out of order; read by file name
        Image.fromarray(np.full((4, 6, 3), 10 * t, np.uint8)).save(frames / f"f{t:02d}.png")
    ds = ClipFolder(str(tmp_path))
    v, _ = ds[0]
    assert v.shape == (5, 1, 4, 6) and torch.equal(v[:, 0], torch.from_numpy(vol))
    w, _ = ds[1]
    assert w.shape == (3, 3, 4, 6) and [int(w[t, 0, 0, 0]) for t in range(3)] == [0, 10, 20]
    np.save(tmp_path / "a" / "bad.npy", np.zeros((2, 3), np.uint8))
    with pytest.raises(UserError, match=r"clip .*bad.npy has shape \(2, 3\); expected \(T, H, W\)"):
        ClipFolder(str(tmp_path))[0]


def test_eval_clip_transform_samples_frames_uniformly_and_normalises():
    from torchvision import tv_tensors

    clip = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    out = build_clip_transform(4, 8, (0.5,), (0.25,), train=False)(tv_tensors.Video(clip))
    idx = torch.linspace(0, 9, 4).long()  # first and last frame kept, evenly spaced between
    want = ((clip[idx].float() / 255 - 0.5) / 0.25).permute(1, 0, 2, 3)
    assert out.shape == (1, 4, 8, 8) and type(out) is torch.Tensor
    torch.testing.assert_close(out, want)


def test_train_and_eval_a_3d_vit_on_a_folder_of_volumes(tmp_path, capsys):
    data = npy_clips(tmp_path / "clips")
    info = dataset_info(data)
    assert info["kind"] == "clips" and info["num_frames"] == 8 and info["in_chans"] == 1
    tr, va, classes = build_dataset_pair(data)
    assert (len(tr), len(va), classes) == (12, 8, ["bright", "dark"])
    run = tmp_path / "run"
    assert main(["train", "--data", data, "--out", str(run), *ARGS]) == 0
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["data"]["kind"] == "clips" and ck["data"]["num_frames"] == 4
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--data", data, "--out",
                 str(tmp_path / "ev"), "--amp", "none"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())  # the run's own final evaluation of this model
    assert metrics["images"] == 8 and metrics["nll"] == pytest.approx(summary["nll"], rel=1e-5)


def test_an_image_model_on_clips_is_a_one_line_error(tmp_path, capsys):
    data = npy_clips(tmp_path / "clips", counts=(2, 2))
    args = [a if a != "vit3d_small_patch16" else "vit_tiny_patch4_32" for a in ARGS]
    args[args.index("--model-kwargs") + 1] = "embed_dim=16,depth=1,num_heads=2"
    assert main(["train", "--data", data, "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds clips" in err[0] and "vit_tiny_patch4_32" in err[0]
