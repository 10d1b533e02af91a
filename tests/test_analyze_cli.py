"""`vitlab analyze` end to end on a tiny checkpoint: every number in analysis.json that can be
recomputed independently is, the report is self-contained, --compare overlays, bad input fails
with one clear line."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.cli import main

OVERRIDES = dict(depth=1, embed_dim=16, num_heads=2, in_chans=1, num_classes=10)
TINY = ["--num-images", "24", "--attention-images", "4", "--lipschitz-images", "2", "--lipschitz-iters", "5",
        "--landscape-steps", "3", "--landscape-images", "8", "--hessian-k", "2", "--hessian-batches", "1",
        "--hessian-batch-size", "8", "--hessian-iters", "4", "--hessian-density-steps", "4",
        "--robustness-images", "8", "--corruptions", "gaussian_noise,contrast", "--severities", "1,5",
        "--batch-size", "8", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch4_28", **OVERRIDES)
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"model": model.state_dict(), "config": {"model": "vit_tiny_patch4_28", "model_overrides": OVERRIDES,
                                                        "data": "mnist", "weight_decay": 0.05}}, path)
    return path, model.eval()


@pytest.fixture(scope="module")
def run_dir(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("an")
    n = torch.get_num_threads()
    try:
        assert main(["analyze", "--checkpoint", str(checkpoint[0]), "--out", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_numbers_match_independent_recomputation(checkpoint, run_dir):
    from vitlab.analysis.cli import augmented_batches, load_data
    from vitlab.analysis.landscape import soft_cross_entropy

    res = json.loads((run_dir / "analysis.json").read_text())
    model = checkpoint[1]
    for key in ("features", "attention", "calibration", "lipschitz", "landscape", "hessian", "robustness"):
        assert key in res and "error" not in res[key], (key, res.get(key))
    assert res["meta"]["model"] == "vit_tiny_patch4_28" and res["meta"]["trained"]
    assert res["meta"]["weight_decay"] == 0.05  # taken from the checkpoint config
    data = load_data("mnist", 8 + 8, 24, 0)
    cfg = model.default_cfg
    x = (data.eval_x[:24] - cfg["mean"][0]) / cfg["std"][0]
    with torch.no_grad():
        logits = model(x)
    top1 = 100 * float((logits.argmax(-1) == data.eval_y[:24]).double().mean())
    assert res["calibration"]["metrics"]["top1"] == pytest.approx(top1)
    assert res["calibration"]["metrics"]["nll"] == pytest.approx(float(F.cross_entropy(logits, data.eval_y[:24])), rel=1e-4)
    # landscape centre = the checkpoint's loss (NLL on the same augmented batches + wd/2 ||θ||²)
    batches = augmented_batches(data.train_x[:8], data.train_y[:8], 10, 8, 0, cfg)
    with torch.no_grad():
        nll = sum(float(soft_cross_entropy(model(xb), yb)) for xb, yb in batches) / len(batches)
    sq = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    assert res["landscape"]["loss"][1][1] == pytest.approx(nll + 0.025 * sq, rel=1e-4)
    assert res["landscape"]["nll"][1][1] == pytest.approx(nll, rel=1e-4)
    # robustness table entries are accuracies over 8 images; clean accuracy agrees with calibration's
    assert res["robustness"]["clean"]["acc"] == pytest.approx(
        float((logits[:8].argmax(-1) == data.eval_y[:8]).double().mean()))
    assert set(res["robustness"]["table"]) == {"gaussian_noise", "contrast"}
    # noise by frequency: band noise (rms 0.1, width 0.1 pi) added in [0, 1] pixel space, clipped
    from vitlab.analysis.robustness import band_noise
    nf = res["robustness"]["noise_frequency"]
    assert nf["frequencies"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] and nf["skipped_frequencies"] == []
    for f in (0.1, 0.9):
        g = torch.Generator().manual_seed(int(round(f * 1000)))  # seed 0, batch 0
        xn = (data.eval_x[:8] + band_noise(data.eval_x[:8].shape, f, 0.1, 0.1, g)).clamp(0, 1)
        with torch.no_grad():
            acc = float((model((xn - cfg["mean"][0]) / cfg["std"][0]).argmax(-1) == data.eval_y[:8]).double().mean())
        assert nf["table"][str(f)]["acc"] == pytest.approx(acc)
        assert nf["table"][str(f)]["delta_acc"] == pytest.approx(acc - res["robustness"]["clean"]["acc"])
    # Lipschitz: the estimate is a lower bound, LayerNorm/softmax attention have no finite global bound
    assert res["lipschitz"]["estimate"] > 0 and res["lipschitz"]["upper_bound"] is None
    assert len(res["hessian"]["max_eigenvalue_spectrum"]) == 2
    assert res["features"]["names"][0] == "patch_embed" and len(res["features"]["high_freq"]) == 3


def test_report_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert "Robustness to noise by frequency" in html
    assert len(srcs) >= 10 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for name in ("fourier.png", "landscape.png", "hessian_spectrum.png", "robustness.png", "reliability.png",
                 "attention_overlay.png", "noise_frequency.png", "landscape_3d.png"):
        assert (run_dir / name).stat().st_size > 1000, name


def test_compare_overlays_runs(run_dir, tmp_path):
    out = tmp_path / "cmp"
    assert main(["analyze", "--compare", str(run_dir), str(run_dir / "analysis.json"), "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert list(res["runs"]) == ["tiny", "tiny_2"]
    html = (out / "report.html").read_text()
    assert html.count("tiny_2") >= 3 and (out / "fourier.png").is_file()


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    assert main(["analyze", "--model", "vit_tiny_patch4_28", "--data", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "ImageFolder" in err[0]
    assert main(["analyze", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["analyze", "--compare", "no_such_run", "--out", str(tmp_path / "o")]) == 2
    assert "no_such_run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--only", "fourier,bogus"])
    assert "bogus" in capsys.readouterr().err


@pytest.mark.parametrize("model,kwargs,size", [
    ("vit_tiny_patch16_224", "depth=1,embed_dim=16,num_heads=2", 224),
    ("vit_tiny_patch4_32", "depth=1,embed_dim=16,num_heads=2", 16),
], ids=["224px", "16px"])
def test_analyze_agrees_with_eval_on_a_trained_checkpoint(tmp_path, capsys, model, kwargs, size):
    """A checkpoint written by `vitlab train` on an ImageFolder, with its own mean/std (not the
    model's default) and an image size other than the files' (12 px): `analyze` must see the
    images `eval` sees (same resize/crop, same normalisation), so the NLL agrees to 1e-6."""
    from conftest import brightness_folder

    folder = brightness_folder(tmp_path / "imgs", {"train": (4, 4), "val": (5, 6)}, seed=1, noise=50, size=12)
    run = tmp_path / "run"
    assert main(["train", "--model", model, "--model-kwargs", kwargs, "--data", folder, "--img-size", str(size),
                 "--mean", "0.3,0.4,0.5", "--std", "0.2,0.25,0.3", "--crop-pct", "0.875", "--epochs", "1",
                 "--max-steps", "1", "--batch-size", "4", "--workers", "0", "--threads", "1", "--no-progress",
                 "--amp", "none", "--out", str(run)]) == 0
    ck = run / "checkpoints" / "last.pt"
    assert main(["eval", "--checkpoint", str(ck), "--out", str(tmp_path / "ev"), "--amp", "none"]) == 0
    want = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert main(["analyze", "--checkpoint", str(ck), "--only", "calibration", "--num-images", "64",
                 "--out", str(tmp_path / "an"), "--no-progress", "--threads", "1"]) == 0
    res = json.loads((tmp_path / "an" / "analysis.json").read_text())
    got = res["calibration"]
    assert got["num_images"] == want["images"] == 11
    assert got["metrics"]["nll"] == pytest.approx(want["nll"], abs=1e-6)
    assert got["metrics"]["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert res["meta"]["normalization"]["mean"] == pytest.approx([0.3, 0.4, 0.5])
    assert res["meta"]["default_cfg"]["input_size"] == [3, size, size]
    # a size the checkpoint was not trained at is an error, never a silent rebuild
    capsys.readouterr()
    assert main(["analyze", "--checkpoint", str(ck), "--only", "calibration", "--model-args", "img_size=32",
                 "--out", str(tmp_path / "an2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img_size=32" in err[0] and f"img_size={size}" in err[0]


def test_checkpoint_of_another_size_is_an_error_not_a_resized_model(tmp_path, capsys):
    """A bare checkpoint (state dict + config without img_size) whose position table is for 32 px:
    the model the config names is 28 px, so analyze must refuse, not interpolate the table."""
    over = dict(OVERRIDES)
    model = vitlab.create_model("vit_tiny_patch4_28", img_size=32, **over)
    path = tmp_path / "ck32.pt"
    torch.save({"model": model.state_dict(), "config": {"model": "vit_tiny_patch4_28", "model_overrides": over,
                                                        "data": "mnist"}}, path)
    assert main(["analyze", "--checkpoint", str(path), "--only", "calibration", "--num-images", "8",
                 "--out", str(tmp_path / "an"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pos_embed" in err[0] and "img_size" in err[0]
    # with the size it was trained at, it loads
    assert main(["analyze", "--checkpoint", str(path), "--model-args", "img_size=32", "--only", "calibration",
                 "--num-images", "8", "--out", str(tmp_path / "an"), "--no-progress"]) == 0
