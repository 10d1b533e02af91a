"""``vitlab eval`` and the calibration metrics it reports."""
import json

import numpy as np
import pytest
import torch
from conftest import brightness_folder
from PIL import Image

from vitlab.analysis.calibration import calibration_metrics


def test_ece_15_bins_agrees_with_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    for k, n in ((10, 500), (3, 97)):
        logits = torch.randn(n, k, generator=g) * 3
        labels = torch.randint(0, k, (n,), generator=g)
        probs = logits.softmax(-1)
        ece = torchmetrics.classification.MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
        assert calibration_metrics(probs, labels, n_bins=15)["ece"] == pytest.approx(float(ece(probs, labels)),
                                                                                   abs=1e-6)


def test_eval_cli_reports_metrics_of_the_checkpoint(tmp_path, capsys):
    from vitlab.cli import main
    from vitlab.engine import TrainConfig, train

    folder = brightness_folder(tmp_path / "imgs", {"train": (8, 8), "val": (8, 8)}, seed=3, noise=60)
    cfg = TrainConfig(model="vit_tiny_patch4_32", model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, patch_size=4),
                      data=folder, img_size=8, out=str(tmp_path / "run"), epochs=1, batch_size=4, lr=5e-3,
                      warmup_epochs=0, progress=False, threads=1, workers=0, crop_pct=1.0, ema=True, amp="none")
    train(cfg)
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["eval", "--checkpoint", str(ck), "--data", folder, "--out", str(tmp_path / "ev"), "--amp", "none"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000
    for key in ("top1", "top5", "nll", "ece", "acc90", "unc90", "freq90", "iou", "iou90", "brier"):
        assert key in m
    assert m["images"] == 16 and m["bins"] == 15 and "Unc-90" in out and "ECE(15 bins)" in out
    # independent computation: rebuild the model from the checkpoint, normalise the files by hand
    import vitlab

    state = torch.load(ck, weights_only=True)
    model = vitlab.create_model("vit_tiny_patch4_32", embed_dim=16, depth=1, num_heads=2, patch_size=4, img_size=8,
                                num_classes=2).eval()
    model.load_state_dict(state["model"])
    mean = torch.tensor(state["data"]["mean"])[:, None, None]
    std = torch.tensor(state["data"]["std"])[:, None, None]
    xs, ys = [], []
    for ci, c in enumerate(("dark", "light")):
        for i in range(8):
            a = torch.from_numpy(np.array(Image.open(f"{folder}/val/{c}/{i}.png"))).permute(2, 0, 1).float() / 255
            xs.append((a - mean) / std)
            ys.append(ci)
    with torch.no_grad():
        p = model(torch.stack(xs)).softmax(-1).double()
    y = torch.tensor(ys)
    conf, pred = p.max(1)
    assert m["top1"] == pytest.approx(100 * (pred == y).double().mean().item())
    assert m["nll"] == pytest.approx(-p[torch.arange(16), y].log().mean().item(), rel=1e-5)
    assert m["freq90"] == pytest.approx((conf > 0.9).double().mean().item())
    # ECE by brute force over 15 equal bins (start, end]
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.double().mean() * ((pred[sel] == y[sel]).double().mean() - conf[sel].mean()).abs()
    assert m["ece"] == pytest.approx(float(ece), abs=1e-6)
    # the EMA weights are evaluated on request and differ from the raw ones
    assert main(["eval", "--checkpoint", str(ck), "--data", folder, "--out", str(tmp_path / "ev2"), "--ema",
                 "--amp", "none"]) == 0
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m2["ema"] is True and m2["nll"] != m["nll"]


def test_eval_cli_errors(tmp_path, capsys):
    from vitlab.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "w.pt"
    torch.save({"weight": torch.zeros(2)}, bad)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "not a vitlab checkpoint" in capsys.readouterr().err
