"""Good defaults on unseen data and settings a timm user expects (issue 17): image size, channels
and crop from the data and the model's default_cfg; plain progress lines in logs; a flag for every
setting; timm's schedules; steps.jsonl and TensorBoard logs."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.engine import TrainConfig
from vitlab.engine.build import data_settings


def _folder(root, size, mode, per_class=3, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (size, size) if mode == "L" else (size, size, 3)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return str(root)


def test_small_grey_folder_trains_at_its_own_size_never_224(tmp_path):
    s = data_settings(TrainConfig(data=_folder(tmp_path / "g", 28, "L")))
    assert (s["img_size"], s["in_chans"], s["crop"], s["crop_pct"], s["hflip"]) == (28, 1, "pad", 1.0, 0.0)
    assert s["model_kwargs"]["patch_size"] == 4 and len(s["mean"]) == 1


def test_large_rgb_folder_gets_patch_16_and_random_resized_crops(tmp_path):
    s = data_settings(TrainConfig(data=_folder(tmp_path / "c", 160, "RGB")))
    assert (s["img_size"], s["in_chans"], s["crop"], s["model_kwargs"]["patch_size"]) == (160, 3, "rrc", 16)


def test_a_named_model_takes_its_default_cfg_size(tmp_path):
    folder = _folder(tmp_path / "g", 28, "L")
    s = data_settings(TrainConfig(data=folder, model="deit_tiny_patch16_224", model_kwargs={}))
    assert s["img_size"] == 224 and s["model_kwargs"] is None and s["crop_pct"] == 0.875
    s = data_settings(TrainConfig(data=folder, model="vit_tiny_patch4_28", model_kwargs={}))
    assert s["img_size"] == 28
    assert data_settings(TrainConfig(data=folder, img_size=40))["img_size"] == 40  # the flag wins


def test_folder_epochs_follow_the_number_of_training_images(tmp_path, monkeypatch):
    from vitlab.engine.config import FOLDER_MAX_EPOCHS, FOLDER_MIN_STEPS, folder_epochs, resolve_config

    # 4,000 images at batch 32: 125 steps an epoch, 20 epochs already make FOLDER_MIN_STEPS steps
    assert folder_epochs(4000, 32) == 20 and folder_epochs(100_000, 32) == 20
    assert folder_epochs(1000, 32) == -(-FOLDER_MIN_STEPS // 32) and folder_epochs(3000, 64) == -(-FOLDER_MIN_STEPS // 47)
    assert folder_epochs(10, 32) == FOLDER_MAX_EPOCHS and folder_epochs(1000, 16, accum_steps=2) == folder_epochs(1000, 32)
    folder = _folder(tmp_path / "f", 8, "L", per_class=5)  # 10 training images: one step an epoch
    assert resolve_config(None, dict(data=folder)).epochs == FOLDER_MAX_EPOCHS
    assert resolve_config(None, dict(data=folder, epochs=3)).epochs == 3  # a flag wins
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 4\n")
    assert resolve_config(str(recipe), dict(data=folder)).epochs == 4  # so does a recipe
    assert resolve_config(None, dict()).epochs == TrainConfig().epochs  # the digits keep the main job's


def test_progress_writes_plain_lines_without_carriage_returns_to_a_log():
    from vitlab.engine.progress import Progress

    log = io.StringIO()
    bar = Progress(True, total=10, initial=0, desc="epoch 1/1", interval=4, stream=log)
    for _ in range(10):
        bar.update(0.5, 1e-3)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and [ln.split()[3] for ln in lines] == ["4/10", "8/10", "10/10"]


def test_every_train_config_field_has_a_command_line_flag():
    import argparse
    import dataclasses

    from vitlab.engine.train_cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    dests = {a.dest for a in p._actions}
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in dests]
    assert missing == []


def test_step_and_multistep_schedules_come_from_timm():
    import vitlab
    from vitlab.engine.optim import build_optimizer, build_scheduler

    m = vitlab.create_model("vit_tiny_patch4_32", embed_dim=16, depth=1, num_heads=2, img_size=8, num_classes=2)
    for sched, kw, want in (("step", dict(decay_epochs=2, decay_rate=0.5), [1, 1, .5, .5, .25]),
                            ("multistep", dict(decay_milestones=[1, 3], decay_rate=0.1), [1, .1, .1, .01, .01])):
        opt = build_optimizer(m, "sgd", 1.0, 0.0)
        s = build_scheduler(opt, TrainConfig(sched=sched, epochs=5, warmup_epochs=0, **kw), steps_per_epoch=3)
        got = []
        for epoch in range(5):
            s.step_update(epoch * 3)
            got.append(opt.param_groups[0]["lr"])
        assert got == pytest.approx(want), sched


def test_step_log_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from conftest import brightness_folder
    from test_engine import tiny_cfg

    from vitlab.engine import train

    folder = brightness_folder(tmp_path / "imgs", {"train": (4, 4), "val": (2, 2)}, seed=0, noise=30)
    train(tiny_cfg(folder, tmp_path / "run", epochs=2, log_interval=3, tensorboard=True))
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [3] and steps[0]["lr"] > 0  # 2 epochs x 2 steps, every 3rd step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ev.Reload()
    assert {"train/loss", "epoch/val_top1"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("epoch/val_top1")] == [2, 4]
