"""The researcher's commands after training (issue 17): eval on a folder with only a test split,
predict, export (ONNX checked with onnxruntime, torch.export), and one-line errors for bad input."""
import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import brightness_folder
from PIL import Image

from vitlab.cli import main

ARGS = ["--model", "vit_tiny_patch4_32", "--model-kwargs", "embed_dim=16,depth=1,num_heads=2,patch_size=4",
        "--img-size", "8", "--epochs", "1", "--batch-size", "4", "--lr", "5e-3", "--warmup-epochs", "0",
        "--threads", "1", "--no-progress", "--amp", "none", "--crop-pct", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    folder = brightness_folder(root / "imgs", {"train": (6, 6), "val": (4, 4)}, seed=4, noise=20)
    assert main(["train", "--data", folder, "--out", str(root / "run"), "--workers", "0", *ARGS]) == 0
    return root, folder


def test_eval_on_a_folder_with_only_a_test_split(trained, tmp_path, capsys):
    root, folder = trained
    test_only = tmp_path / "only"
    shutil.copytree(f"{folder}/val", test_only / "test")
    ck = str(root / "run" / "checkpoints" / "last.pt")
    assert main(["eval", "--checkpoint", ck, "--data", str(test_only), "--out", str(tmp_path / "a"), "--amp", "none"]) == 0
    assert main(["eval", "--checkpoint", ck, "--data", folder, "--out", str(tmp_path / "b"), "--amp", "none"]) == 0
    # the class folders themselves are accepted too
    assert main(["eval", "--checkpoint", ck, "--data", str(test_only / "test"), "--out", str(tmp_path / "c"),
                 "--amp", "none"]) == 0
    a, b, c = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "abc")
    assert a["images"] == b["images"] == c["images"] == 8 and a["nll"] == b["nll"] == c["nll"]
    (test_only / "test" / "dark").rename(test_only / "test" / "other")
    assert main(["eval", "--checkpoint", ck, "--data", str(test_only)]) == 2
    assert "differ from the training classes" in capsys.readouterr().err


def test_eval_bf16_is_bf16_and_close_to_float32(trained, tmp_path):
    root, folder = trained
    ck = str(root / "run" / "checkpoints" / "last.pt")
    for amp in ("none", "bf16"):
        assert main(["eval", "--checkpoint", ck, "--data", folder, "--out", str(tmp_path / amp), "--amp", amp]) == 0
    f, b = (json.loads((tmp_path / a / "metrics.json").read_text()) for a in ("none", "bf16"))
    assert b["amp"] == "bf16" and f["amp"] == "none"
    assert b["nll"] != f["nll"] and b["nll"] == pytest.approx(f["nll"], rel=0.05)


def test_predict_writes_topk_names_and_probabilities(trained, tmp_path, capsys):
    root, folder = trained
    run = str(root / "run")
    files = [f"{folder}/val/dark/0.png", f"{folder}/val/light/1.png"]
    assert main(["predict", "--checkpoint", run, "--topk", "2", "--amp", "none", *files]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == [files[0]] * 2 + [files[1]] * 2
    assert {r["name"] for r in rows} == {"dark", "light"} and [r["rank"] for r in rows] == ["1", "2"] * 2
    p = [float(r["prob"]) for r in rows]
    assert p[0] >= p[1] and p[0] + p[1] == pytest.approx(1, abs=1e-5)
    # the probabilities are the model's: compare with eval's pipeline done by hand
    import vitlab

    ck = torch.load(root / "run" / "checkpoints" / "best.pt", weights_only=True)
    m = vitlab.create_model("vit_tiny_patch4_32", embed_dim=16, depth=1, num_heads=2, patch_size=4, img_size=8,
                            num_classes=2).eval()
    m.load_state_dict(ck["model"])
    a = torch.from_numpy(np.array(Image.open(files[0]))).permute(2, 0, 1).float() / 255
    x = (a - torch.tensor(ck["data"]["mean"])[:, None, None]) / torch.tensor(ck["data"]["std"])[:, None, None]
    with torch.no_grad():
        want = m(x[None]).softmax(-1)[0]
    top = [r for r in rows if r["path"] == files[0]][0]
    assert float(top["prob"]) == pytest.approx(want.max().item(), abs=1e-5)
    # a folder, as JSON
    out = tmp_path / "p.json"
    assert main(["predict", "--checkpoint", run, "--out", str(out), f"{folder}/val"]) == 0
    recs = json.loads(out.read_text())
    assert len(recs) == 8 and all(len(r["top"]) == 2 for r in recs)


def test_export_onnx_matches_pytorch_in_onnxruntime_and_torch_export_loads(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root, _ = trained
    from vitlab.engine.inference import load_for_inference

    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(onnx_path)]) == 0
    im = load_for_inference(str(root / "run"))
    x = torch.randn(5, 3, 8, 8)  # another batch size than the export's: the batch dimension is dynamic
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = im.model(x)
    assert (got - want).abs().max() < 1e-4 and json.loads((tmp_path / "m.onnx.json").read_text())["classes"] == \
        ["dark", "light"]
    pt2 = tmp_path / "m.pt2"
    assert main(["export", "--checkpoint", str(root / "run"), "--format", "exported", "--out", str(pt2)]) == 0
    ep = torch.export.load(str(pt2))
    torch.testing.assert_close(ep.module()(x), want, atol=1e-5, rtol=1e-5)


def _one_line(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert needle in err, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("workers", [0, 1])
def test_broken_image_is_one_line_with_and_without_workers(tmp_path, capsys, workers):
    folder = brightness_folder(tmp_path / "imgs", {"train": (4, 4), "val": (2, 2)}, seed=0, noise=20)
    bad = tmp_path / "imgs" / "train" / "dark" / "1.png"
    bad.write_bytes(b"not a png")
    assert main(["train", "--data", folder, "--out", str(tmp_path / "run"), "--workers", str(workers), *ARGS]) == 2
    _one_line(capsys, f"cannot read image file {bad}")


@pytest.mark.parametrize("argv, needle", [
    (["--model-kwargs", "depth=abc"], "depth='abc'"),
    (["--model-kwargs", "dpeth=3"], "dpeth"),
    (["--model", "vit_tiny_patch4_33"], "vit_tiny_patch4_32"),
    (["--opt", "adamww"], "did you mean adamw"),
    (["--sched", "cosin"], "sched must be one of"),
    (["--epochs", "0"], "epochs must be > 0"),
    (["--accum-steps", "5"], "exceeds the"),
    (["--pretrained", "/no/such/weights.pth"], "/no/such/weights.pth"),
    (["--clip-grad", "0"], "clip-grad must be > 0"),
    (["--max-steps", "0"], "max-steps must be >= 1"),
    (["--warmup-epochs", "5"], "exceeds epochs"),
    (["--smoothing", "1.5"], "smoothing must be in [0, 1)"),
    (["--layer-decay", "2"], "layer-decay must be in (0, 1]"),
    (["--hflip", "2"], "hflip must be a probability"),
    (["--crop-pct", "1.5"], "crop_pct must be in (0, 1]"),
    (["--mean", "0.5,0.5"], "have 2 values but the data has 3 channels"),
    (["--randaug", "autoaug"], "RandAugment string"),
])
def test_bad_train_input_is_one_line(tmp_path, capsys, argv, needle):
    folder = brightness_folder(tmp_path / "imgs", {"train": (4, 4), "val": (2, 2)}, seed=0, noise=20)
    out = tmp_path / "run"
    assert main(["train", "--data", folder, "--out", str(out), "--workers", "0", *ARGS, *argv]) == 2
    _one_line(capsys, needle)


def test_failed_run_leaves_the_previous_checkpoint_intact(trained, capsys):
    root, folder = trained
    last = root / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert main(["train", "--data", folder, "--out", str(root / "run"), "--workers", "0", *ARGS,
                 "--model-kwargs", "depth=abc", "--resume", "auto"]) == 2
    _one_line(capsys, "depth")
    assert last.read_bytes() == before
    # a new run into the same directory would overwrite it: refused, nothing touched
    metrics = (root / "run" / "metrics.jsonl").read_bytes()
    assert main(["train", "--data", folder, "--out", str(root / "run"), "--workers", "0", *ARGS]) == 2
    _one_line(capsys, "already holds a run")
    assert last.read_bytes() == before and (root / "run" / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("argv, needle", [
    (["predict", "--checkpoint", "/no/ckpt.pt", "x.png"], "checkpoint not found"),
    (["export", "--checkpoint", "/no/ckpt.pt"], "checkpoint not found"),
    (["eval", "--checkpoint", "/no/ckpt.pt"], "checkpoint not found"),
])
def test_bad_paths_for_other_commands_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    _one_line(capsys, needle)


def test_predict_on_missing_or_broken_images_is_one_line(trained, tmp_path, capsys):
    root, _ = trained
    assert main(["predict", "--checkpoint", str(root / "run"), str(tmp_path / "nope.png")]) == 2
    _one_line(capsys, "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"xx")
    assert main(["predict", "--checkpoint", str(root / "run"), str(bad)]) == 2
    _one_line(capsys, "cannot read image file")
