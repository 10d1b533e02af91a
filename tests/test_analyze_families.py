"""`vitlab analyze --model NAME` on every family of the parts matrix at its small size (issue 15): each
instrument runs on the bundled digits (resized and channel-matched to the model), on the model the name and
overrides build (its parameter count is recomputed here), with finite numbers."""
import json
import math

import pytest
import torch

import vitlab
from vitlab.cli import main
from vitlab.models.parts_table import FAMILY_EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = ["--num-images", "8", "--attention-images", "2", "--calibration-images", "8", "--lipschitz-images", "1",
         "--lipschitz-iters", "2", "--landscape-steps", "2", "--landscape-images", "4", "--hessian-k", "1",
         "--hessian-batches", "1", "--hessian-batch-size", "2", "--hessian-iters", "2", "--hessian-density-steps", "2",
         "--robustness-images", "4", "--corruptions", "gaussian_noise", "--severities", "1",
         "--noise-frequencies", "0.5", "--batch-size", "8", "--no-progress", "--threads", "1", "--amp", "none"]
VIDEO = ("video",)  # clips, not images: analysed through `vitlab analyze --data` on a clips folder, not the digits


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)


@pytest.mark.parametrize("family", [f for f in FAMILY_EXAMPLES if f not in VIDEO])
def test_analyze_runs_every_instrument_on_each_family(tmp_path, family):
    name, small, _ = FAMILY_EXAMPLES[family]
    args = [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in small.items()]
    assert main(["analyze", "--model", name, "--model-args", *args, "--out", str(tmp_path), *SIZES]) == 0
    res = json.loads((tmp_path / "analysis.json").read_text())
    model = vitlab.create_model(name, **small)
    assert res["meta"]["parameters"] == sum(p.numel() for p in model.parameters())
    for key in ("features", "attention", "calibration", "lipschitz", "landscape", "hessian", "robustness"):
        assert key in res, f"{family}: no {key} section"
    assert res["calibration"]["num_images"] == 8 and res["robustness"]["num_images"] == 4
    assert len(res["features"]["names"]) >= 2 and res["attention"]["names"]  # every family records attention
    bad = [x for x in _numbers({k: res[k] for k in ("features", "calibration", "landscape", "hessian", "robustness")})
           if not math.isfinite(x)]
    assert not bad, f"{family}: non-finite numbers in analysis.json"
