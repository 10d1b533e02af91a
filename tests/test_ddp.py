"""DDP with ``torchrun --nproc_per_node 2`` on CPU (gloo): two processes with batch B each
must match one process with batch 2B (same samples, same augmentation, averaged gradients),
and the metrics gathered from both ranks must equal the full validation set's."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import brightness_folder


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(folder, out, batch, opt):
    lr = "0.01" if opt == "adamw" else "0.2"
    return ["-m", "vitlab", "train", "--data", folder, "--out", str(out), "--model", "vit_tiny_patch4_32",
            "--model-kwargs", "embed_dim=16,depth=2,num_heads=2,patch_size=4", "--img-size", "8", "--epochs", "2",
            "--batch-size", str(batch), "--lr", lr, "--opt", opt, "--warmup-epochs", "0", "--crop", "rrc",
            "--hflip", "0.5", "--threads", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--amp", "none"]


# AdamW is invariant to the scale of the gradient (a loss wrongly divided by the world size passes);
# SGD moves each weight by lr x gradient, so the same bug moves weights by half a step
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, opt):
    folder = brightness_folder(tmp_path / "imgs", {"train": (8, 8), "val": (6, 7)}, seed=2, noise=50,
                               levels=(70, 180))  # 13 val images: uneven shards across 2 ranks
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, *_args(folder, tmp_path / "single", 8, opt)], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          *_args(folder, tmp_path / "ddp", 4, opt)], env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("run directory:") == 1  # only rank 0 reports

    cfg = yaml.safe_load((tmp_path / "ddp" / "config.yaml").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["global_batch"] == 8
    a = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # Adam divides each gradient entry by its own scale, so the rounding of the 2-rank all-reduce on
    # near-zero entries can move a weight by a small fraction of lr (0.01): 1e-4 allows 1 % of one
    # step; wrong samples or augmentation on a rank move weights by ~lr per step
    tol = 1e-4 if opt == "adamw" else 1e-5  # SGD: no per-entry normalisation, rounding stays at float level
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol)
    sa = json.loads((tmp_path / "single" / "summary.json").read_text())
    sb = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert sb["world_size"] == 2 and sb["steps"] == sa["steps"] == 4
    # metrics over all 13 validation images (gathered from both ranks, none duplicated)
    assert sb["top1"] == pytest.approx(sa["top1"]) and round(sb["top1"] * 13 / 100, 6).is_integer()
    assert sb["nll"] == pytest.approx(sa["nll"], rel=1e-4)
    ma = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb):  # train loss all-reduced over ranks = the single process's mean
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
