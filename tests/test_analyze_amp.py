"""`vitlab analyze --amp` (issue 17): bf16 autocast reaches the model's layers for the instruments that
allow it, float32 instruments (Hessian, Lipschitz, landscape) say so and stay float32, and
analysis.json records the dtype of each.  The dtype is observed inside the model: a global forward
hook records the output dtype of every ``nn.Linear`` while an instrument runs."""
import json

import pytest
import torch
from torch import nn

from vitlab.analysis import runner
from vitlab.cli import main
from vitlab.engine import amp as amp_mod

MODEL = ["--model", "vit_tiny_patch4_28", "--model-args", "depth=1", "embed_dim=16", "num_heads=2"]
TINY = ["--num-images", "16", "--attention-images", "2", "--lipschitz-images", "1", "--lipschitz-iters", "2",
        "--landscape-steps", "2", "--landscape-images", "4", "--hessian-batches", "1", "--hessian-batch-size", "4",
        "--robustness-images", "4", "--batch-size", "8", "--no-progress", "--threads", "1"]


@pytest.fixture
def linear_dtypes(monkeypatch):
    """instrument key -> set of dtypes of Linear outputs seen while that instrument ran."""
    seen, current = {}, []
    real_run_jobs = runner._run_jobs

    def hook(module, args, out):
        if isinstance(module, nn.Linear) and current:
            seen.setdefault(current[-1], set()).add(out.dtype)

    def run_jobs(jobs, *a, **k):  # one job at a time, so that the hook knows which instrument runs
        for job in jobs:
            current.append(job)
            real_run_jobs([job], *a, **k)
            current.pop()

    monkeypatch.setattr(runner, "_run_jobs", run_jobs)
    handle = nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


def _analyze(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["analyze", *MODEL, "--out", str(out), *TINY, *extra]) == 0
    return json.loads((out / "analysis.json").read_text())


def test_bf16_reaches_the_layers_and_float32_instruments_stay_float32(tmp_path, linear_dtypes):
    res = _analyze(tmp_path, "bf16", "--amp", "bf16", "--only", "calibration,fourier,lipschitz,hessian")
    assert res["meta"]["amp"] == "bf16"
    assert linear_dtypes["calibration"] == linear_dtypes["features"] == {torch.bfloat16}
    assert linear_dtypes["lipschitz"] == linear_dtypes["hessian"] == {torch.float32}
    prec = res["precision"]
    assert prec["calibration"]["dtype"] == prec["features"]["dtype"] == "bfloat16"
    for key in ("lipschitz", "hessian"):
        assert prec[key]["dtype"] == "float32" and "float32 although --amp is bf16" in prec[key]["note"]
        assert "error" not in res[key]
    assert "error" not in res["calibration"] and "error" not in res["features"]
    assert "bfloat16 autocast (float32: lipschitz, hessian)" in (tmp_path / "bf16" / "report.html").read_text()


def test_none_is_float32_and_bf16_changes_the_numbers_only_slightly(tmp_path, linear_dtypes):
    f32 = _analyze(tmp_path, "f32", "--amp", "none", "--only", "calibration")
    assert linear_dtypes["calibration"] == {torch.float32}
    assert f32["meta"]["amp"] == "none" and f32["precision"]["calibration"] == {"dtype": "float32"}
    b16 = _analyze(tmp_path, "b16", "--amp", "bf16", "--only", "calibration")
    nll32, nll16 = f32["calibration"]["metrics"]["nll"], b16["calibration"]["metrics"]["nll"]
    assert nll16 != nll32 and nll16 == pytest.approx(nll32, rel=0.05)


@pytest.mark.parametrize("native,width,want", [("1", 192, "bf16"), ("1", 16, "none"), ("0", 192, "none")])
def test_auto_follows_the_cpu_and_the_model_width(tmp_path, monkeypatch, linear_dtypes, native, width, want):
    monkeypatch.setenv("VITLAB_NATIVE_BF16", native)
    amp_mod.cpu_has_native_bf16.cache_clear()
    try:
        out = tmp_path / "auto"
        assert main(["analyze", "--model", "vit_tiny_patch4_28", "--model-args", "depth=1", f"embed_dim={width}",
                     "num_heads=2", "--out", str(out), *TINY, "--only", "calibration"]) == 0
    finally:
        amp_mod.cpu_has_native_bf16.cache_clear()
    res = json.loads((out / "analysis.json").read_text())
    assert res["meta"]["amp"] == want and res["meta"]["amp_requested"] == "auto"
    assert linear_dtypes["calibration"] == {torch.bfloat16 if want == "bf16" else torch.float32}
