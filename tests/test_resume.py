"""Exact resume: a run SIGKILLed in the middle of an epoch and resumed with ``--resume auto``
ends with bit-identical weights (model and EMA) and metrics to an uninterrupted run.

The kill is deterministic: the training process kills itself with SIGKILL right after writing the
checkpoint of optimizer step 5 (no polling, no timing)."""
import json
import os
import signal
import subprocess
import sys

import torch
from conftest import brightness_folder


# runs `vitlab` with atomic_save wrapped: after the checkpoint of (epoch 0, step KILL_AT) is on disk,
# the process SIGKILLs itself, as a machine losing power would stop it
KILLER = """
import os, signal, sys
import vitlab.engine.state as state
real = state.atomic_save
def save(obj, path):
    real(obj, path)
    if (obj["epoch"], obj["step"]) == (0, int(os.environ["KILL_AT"])):
        os.kill(os.getpid(), signal.SIGKILL)
state.atomic_save = save
from vitlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(folder, out, *extra, kill=False):
    # every RNG consumer is on: per-sample RandAugment / random erasing (seeded transforms),
    # Mixup/CutMix (numpy RNG), drop path (torch RNG), EMA, warmup + cosine schedule
    return [sys.executable, *(["-c", KILLER] if kill else ["-m", "vitlab"]), "train", "--data", folder, "--out", str(out),
            "--model", "vit_tiny_patch4_32", "--model-kwargs", "embed_dim=16,depth=2,num_heads=2,patch_size=4",
            "--img-size", "8", "--epochs", "2", "--batch-size", "2", "--lr", "0.005", "--warmup-epochs", "0.5",
            "--crop", "rrc", "--randaug", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8",
            "--cutmix", "1.0", "--drop-path", "0.1", "--ema", "--ema-decay", "0.9", "--threads", "1", "--workers", "0",
            "--no-progress", "--ckpt-every-steps", "5", "--amp", "none", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", KILL_AT="10")


DETERMINISTIC = ("epoch", "step", "train_loss", "lr", "val_top1", "val_top5", "val_nll", "val_ece",
                 "ema_val_top1", "ema_val_nll")


def test_sigkill_mid_epoch_then_resume_auto_is_exact(tmp_path):
    folder = brightness_folder(tmp_path / "imgs", {"train": (16, 16), "val": (6, 6)}, seed=1, noise=40)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ckpt = cut / "checkpoints" / "last.pt"
    killed = subprocess.run(_cmd(folder, cut, kill=True), env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 10)  # mid-epoch (16 steps), after two step checkpoints

    r = subprocess.run(_cmd(folder, cut, "--resume", "auto"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(epoch 0, step {state['step']} of 16)" in r.stdout
    r = subprocess.run(_cmd(folder, ref), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    ma = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        assert {k: ra[k] for k in DETERMINISTIC} == {k: rb[k] for k in DETERMINISTIC}
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, cut))
    assert (sa["top1"], sa["nll"], sa["ece"]) == (sb["top1"], sb["nll"], sb["ece"])
    assert sb["resumed_from"]["step"] == state["step"]


def test_resume_auto_without_out_is_a_user_error(capsys):
    from vitlab.cli import main

    assert main(["train", "--resume", "auto"]) == 2
    assert "--resume auto needs --out" in capsys.readouterr().err
