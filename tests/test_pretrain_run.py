"""``vitlab pretrain`` end to end: a tiny run whose checkpoint ``vitlab train --pretrained`` loads, exact
resume, and bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.engine.checkpoint import load_checkpoint
from vitlab.pretrain.config import PretrainConfig
from vitlab.pretrain.runner import pretrain

QUIET = dict(eval="none", progress=False, log_interval=0, workers=0)


def test_tiny_run_writes_a_checkpoint_that_train_pretrained_loads(tmp_path, capsys):
    from vitlab.engine import build
    from vitlab.engine.config import TrainConfig

    out = str(tmp_path / "mae")
    rc = main(["pretrain", "--method", "mae", "--epochs", "1", "--max-steps", "2", "--batch-size", "16",
               "--eval", "none", "--out", out, "--no-progress", "--workers", "0", "--log-interval", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))
    assert ckpt["method"] == "mae" and ckpt["step"] == 2 and "fine-tune: vitlab train --pretrained" in printed
    for name in ("config.yaml", "steps.jsonl", "metrics.jsonl", "summary.json", "model.safetensors", "config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    kwargs = json.loads(printed.split("--model-kwargs '")[1].split("'")[0])
    cfg = TrainConfig(model=ckpt["model_name"], model_kwargs=kwargs, pretrained=os.path.join(out, "checkpoints",
                                                                                               "last.pt"), workers=0)
    data = build.build_data(cfg, 1, 0, False)
    parts = build.build_parts(cfg, data, torch.device("cpu"), 1)  # what `vitlab train --pretrained` runs
    sd = parts.model.state_dict()
    assert set(ckpt["model"]) == set(sd) - {"head.weight", "head.bias"}
    for k, v in ckpt["model"].items():
        assert torch.equal(sd[k], v), k
    assert sd["head.weight"].shape[0] == 10  # a new head for the digits' classes
    assert "newly initialised head.bias, head.weight" in parts.pretrained_report


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageFolder (grey 28 px images; 32 train, 8 val): 4 steps per epoch at batch 8."""
    root = tmp_path_factory.mktemp("pretrain_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(n):
                img = (rng.random((28, 28)) * 255 * (0.5 if cls == "a" else 1.0)).astype(np.uint8)
                Image.fromarray(img, mode="L").save(root / split / cls / f"{i}.png")
    return str(root)


def _final(tmp_path, name, **kw):
    cfg = PretrainConfig(out=str(tmp_path / name), **QUIET, **kw)
    pretrain(cfg, log=lambda *_: None)
    return load_checkpoint(str(tmp_path / name / "checkpoints" / "last.pt"))


def _assert_same(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for k, v in a["method_state"].items():
        assert torch.equal(v, b["method_state"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), (i, k)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_exact_resume_across_an_epoch_end(tmp_path, folder, method):
    kw = dict(method=method, data=folder, epochs=2, batch_size=8, warmup_epochs=0.5)  # 4 steps per epoch
    whole = _final(tmp_path, "whole", max_steps=6, **kw)
    _final(tmp_path, "parts", max_steps=3, **kw)  # stops mid-epoch
    cfg = PretrainConfig(out=str(tmp_path / "parts"), resume="auto", max_steps=6, **QUIET, **kw)
    summary = pretrain(cfg, log=lambda *_: None)
    assert summary["resumed_from"]["step"] == 3
    _assert_same(whole, load_checkpoint(str(tmp_path / "parts" / "checkpoints" / "last.pt")))


def test_exact_resume_dino_across_an_epoch_end(tmp_path, folder):
    kw = dict(method="dino", data=folder, epochs=2, batch_size=8, local_crops=2, out_dim=64, hidden_dim=32,
              bottleneck_dim=16, warmup_epochs=0.5)
    whole = _final(tmp_path, "whole", max_steps=6, **kw)
    _final(tmp_path, "parts", max_steps=3, **kw)
    cfg = PretrainConfig(out=str(tmp_path / "parts"), resume="auto", max_steps=6, **QUIET, **kw)
    pretrain(cfg, log=lambda *_: None)
    resumed = load_checkpoint(str(tmp_path / "parts" / "checkpoints" / "last.pt"))
    _assert_same(whole, resumed)
    assert any(k.startswith("teacher.") for k in whole["method_state"]) and "loss.center" in whole["method_state"]
    assert not torch.equal(whole["method_state"]["loss.center"], torch.zeros_like(whole["method_state"]["loss.center"]))


def test_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "mae")
    common = ["--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--eval", "none", "--no-progress",
              "--workers", "0", "--log-interval", "0"]
    assert main(["pretrain", "--method", "mae", "--out", out, *common]) == 0
    capsys.readouterr()
    cases = [(["--method", "dino", "--out", out, "--resume", "auto"], "'mae'"),
             (["--method", "mae", "--mask-ratio", "1.2", "--out", str(tmp_path / "x")], "--mask-ratio 1.2"),
             (["--method", "dino", "--local-size", "32", "--out", str(tmp_path / "y")], "--local-size 32"),
             (["--method", "mae", "--model", "swin_tiny_patch4_window7_224", "--model-kwargs",
               '{"window_size": 2, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}',
               "--img-size", "32", "--out", str(tmp_path / "z")], "--method simmim")]
    for extra, needle in cases:
        assert main(["pretrain", *extra, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
