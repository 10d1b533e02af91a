"""`vitlab analyze` prints each instrument's cost before its work, and the counts in that line are
the work done (model forward passes counted by a hook); the budget's automatic sizes fit each
instrument's share for given seconds per pass, and sizes the user gives are never changed."""
import argparse
import json
import re
import sys

import pytest
import torch

from vitlab.analysis import instruments
from vitlab.analysis.instruments import budget
from vitlab.cli import main

MODEL = ["--model", "vit_tiny_patch4_28", "--model-args", "depth=1", "embed_dim=16", "num_heads=2", "--data", "mnist"]
SIZES = ["--num-images", "12", "--calibration-images", "10", "--attention-images", "3", "--lipschitz-images", "2",
         "--lipschitz-iters", "2", "--landscape-steps", "2", "--landscape-images", "6", "--hessian-k", "2",
         "--hessian-batches", "2", "--hessian-batch-size", "3", "--hessian-iters", "3", "--hessian-density-steps", "2",
         "--robustness-images", "5", "--corruptions", "gaussian_noise,contrast", "--severities", "2",
         "--noise-frequencies", "0.3,0.6"]
COMMON = ["--batch-size", "4", "--no-progress", "--threads", "1"]
ORDER = ["features", "attention", "calibration", "lipschitz", "landscape", "hessian", "robustness"]


@pytest.fixture
def counted(monkeypatch):
    """Every model forward (through the patch embedding) writes `<fwd B>` on stderr."""
    from vitlab.analysis import runner
    real = runner.build_model

    def build(*a, **k):
        model, info = real(*a, **k)
        model.patch_embed.register_forward_hook(lambda m, i, o: print(f"<fwd {i[0].shape[0]}>", file=sys.stderr))
        return model, info
    monkeypatch.setattr(runner, "build_model", build)


def _segments(err: str):
    """[(instrument, its cost line, images through forward passes after it)] in printed order, and
    the images through forward passes before the first cost line."""
    segs, before = [], 0
    for line in err.splitlines():
        m = re.match(r"^  (\w+): (.*)$", line)
        if m and m.group(1) in ORDER:
            segs.append([m.group(1), m.group(2), 0])
        for b in re.findall(r"<fwd (\d+)>", line):
            if segs:
                segs[-1][2] += int(b)
            else:
                before += int(b)
    return segs, before


def _num(line: str, pattern: str) -> int:
    return int(re.search(pattern, line).group(1).replace(",", ""))


def test_cost_line_comes_first_and_counts_the_work_done(tmp_path, capsys, counted):
    out = tmp_path / "an"
    n = torch.get_num_threads()
    try:
        assert main(["analyze", *MODEL, *SIZES, *COMMON, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    segs, before = _segments(capsys.readouterr().err)
    res = json.loads((out / "analysis.json").read_text())
    assert [s[0] for s in segs] == ORDER and before == 0  # every sizes given: nothing timed, nothing run before
    for key, line, images in segs:
        assert "error" not in res[key], res[key]
        assert images > 0 and _num(line, r"= ([\d,]+) image forward passes") == images, (key, line, images)
    line = dict((k, v) for k, v, _ in segs)
    assert res["features"]["num_images"] == _num(line["features"], r"over (\d+) images") == 12
    assert res["calibration"]["num_images"] == _num(line["calibration"], r"over (\d+) images") == 10
    assert res["attention"]["num_images"] == _num(line["attention"], r"over (\d+) images") == 3
    assert res["lipschitz"]["estimate_images"] == 2 and res["lipschitz"]["estimate_iters"] == 2
    assert "2 iterations" in line["lipschitz"] and "over 2 images" in line["lipschitz"]
    lan = res["landscape"]
    assert (lan["steps"], lan["num_samples"], lan["evaluations"] + 1) == (2, 6, _num(line["landscape"],
                                                                                    r"= (\d+) evaluations"))
    hes = res["hessian"]
    assert (hes["iters"], hes["batch_size"], hes["batches"], len(hes["max_eigenvalue_spectrum"])) == (3, 3, 2, 4)
    assert _num(line["hessian"], r"= (\d+) Hessian-vector products") == 3 * 2 + 2
    assert len(hes["density"]["nodes"][0]) == 2
    rob = res["robustness"]
    assert rob["num_images"] == 5 and set(rob["table"]) == {"gaussian_noise", "contrast"}
    assert rob["noise_frequency"]["frequencies"] == [0.3, 0.6]
    assert _num(line["robustness"], r"= (\d+) sets") == 2 * 1 + 1 + 2 + 1


FAKE = {"forward": 0.01, "features": 0.03, "attention": 0.05, "hvp": 0.2}  # seconds per image


def _data(side=224, n_train=64, n_eval=300):
    x = torch.zeros(1, 3, side, side)
    return argparse.Namespace(train_x=x.expand(n_train, -1, -1, -1), eval_x=x.expand(n_eval, -1, -1, -1))


def _args(**given):
    p = argparse.ArgumentParser()
    from vitlab.analysis.cli import add_arguments
    add_arguments(p)
    args = p.parse_args([])
    for k, v in given.items():
        setattr(args, k, v)
    return args


def _seconds(key, a, data, corrupt_s):
    """Each instrument's time from the fake seconds per image, written out independently."""
    ev, tr = len(data.eval_x), len(data.train_x)
    if key == "features":
        return min(a.num_images, ev) * FAKE["features"]
    if key == "attention":
        return min(a.attention_images, ev) * FAKE["attention"] + 3 * FAKE["forward"]
    if key == "calibration":
        return min(a.calibration_images, ev) * FAKE["forward"]
    if key == "lipschitz":
        n = min(a.lipschitz_images, ev)
        return n * a.lipschitz_iters * FAKE["hvp"] + (n + 1) * FAKE["forward"]
    if key == "landscape":
        return (a.landscape_steps ** 2 + 1) * min(a.landscape_images, tr) * FAKE["forward"]
    if key == "hessian":
        n = min(a.hessian_batch_size * a.hessian_batches, tr)
        return (a.hessian_iters * n + a.hessian_density_steps * min(n, a.hessian_batch_size)) * FAKE["hvp"]
    n, sev = min(a.robustness_images, ev), len(a.severities)
    sets = len(a.corruptions) * sev + 1 + len(a.noise_frequencies) + 1  # every band exists at 224 px
    return n * sets * FAKE["forward"] + corrupt_s * n * sev * len(a.corruptions)


@pytest.mark.parametrize("share", [0.5, 3.0, 20.0, 1e6])
def test_chosen_sizes_fit_the_share_and_are_the_largest_that_do(monkeypatch, share):
    from vitlab.analysis.instruments import robustness
    monkeypatch.setattr(robustness, "CORRUPTION_SECONDS", {c: (0.002, 0.002, 0.0) for c in robustness.CORRUPTIONS})
    data = _data()
    timer = budget.PassTimer(None, None, None, fixed=FAKE)
    for key, mod in instruments.by_key().items():
        args = _args()
        plan = budget.plan_instrument(mod, args, data, timer, None, "float32", share)
        got = _seconds(key, args, data, 0.002)
        assert plan["estimate_s"] == pytest.approx(got), key
        if plan["fits"]:
            assert got <= share
        # every larger combination (earlier on the ladder walk) is over the share
        for level in budget.levels(mod.SIZES, {}):
            if all(level[k] == getattr(args, k) for k in level):
                break
            bigger = argparse.Namespace(**{**vars(_args()), **level})
            assert _seconds(key, bigger, data, 0.002) > share, (key, level)
        if share == 1e6:  # ample time: the full defaults
            assert all(getattr(args, s.name) == s.ladder[0] for s in mod.SIZES), key


def test_user_sizes_win_even_over_the_share():
    data = _data()
    timer = budget.PassTimer(None, None, None, fixed=FAKE)
    args = _args(landscape_steps=11)
    plan = budget.plan_instrument(instruments.by_key()["landscape"], args, data, timer, None, "float32", 0.01)
    assert args.landscape_steps == 11 and args.landscape_images == 2 and not plan["fits"]
    assert plan["auto"] == ["landscape_images"]
    args = _args(num_images=7)  # --num-images given: calibration takes it, the budget does not touch it
    budget.plan_instrument(instruments.by_key()["calibration"], args, data, timer, None, "float32", 0.01)
    assert args.calibration_images == 7
    args = _args(hessian_k=12)  # fewer Lanczos steps than eigenvalues is never chosen
    budget.plan_instrument(instruments.by_key()["hessian"], args, data, timer, None, "float32", 0.01)
    assert args.hessian_iters >= 12


def test_analyze_applies_the_plan_and_records_it(tmp_path, capsys, monkeypatch):
    real = budget.PassTimer
    monkeypatch.setattr(budget, "PassTimer", lambda m, x, y: real(m, x, y, fixed=FAKE))
    out = tmp_path / "an"
    n = torch.get_num_threads()
    try:  # landscape and hessian sizes automatic, robustness skipped (its table is of real seconds)
        assert main(["analyze", *MODEL, *COMMON, "--only", "landscape,hessian", "--hessian-batches", "1",
                     "--budget", "40", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    res = json.loads((out / "analysis.json").read_text())
    plan = res["meta"]["budget"]["instruments"]
    w = {k: instruments.by_key()[k].WEIGHT for k in ("landscape", "hessian")}
    shares = {k: 40 * v / sum(w.values()) for k, v in w.items()}
    assert {k: plan[k]["share_s"] for k in shares} == pytest.approx(shares)
    lan, hes = plan["landscape"]["sizes"], plan["hessian"]["sizes"]
    assert res["landscape"]["steps"] == lan["landscape_steps"] and res["landscape"]["num_samples"] == \
        lan["landscape_images"]
    assert (res["hessian"]["iters"], res["hessian"]["batch_size"]) == (hes["hessian_iters"], hes["hessian_batch_size"])
    assert (lan["landscape_steps"] ** 2 + 1) * lan["landscape_images"] * FAKE["forward"] <= shares["landscape"]
    hvps = hes["hessian_iters"] + hes["hessian_density_steps"]
    assert hvps * hes["hessian_batch_size"] * FAKE["hvp"] <= shares["hessian"]
    assert f"--landscape-steps {lan['landscape_steps']}" in err and "budget 40 s over 2 instruments" in err


def test_levels_shrink_in_turn_and_keep_fixed_sizes(capsys):
    sizes = (budget.Size("a", (4, 2, 1)), budget.Size("b", (9, 5)), budget.Size("c", (3, 2)))
    assert list(budget.levels(sizes, {"c": 7})) == [{"a": 4, "b": 9, "c": 7}, {"a": 2, "b": 9, "c": 7},
                                                    {"a": 2, "b": 5, "c": 7}, {"a": 1, "b": 5, "c": 7}]
    with pytest.raises(SystemExit):
        main(["analyze", "--budget", "-1"])
    assert "expected a number >= 0, got -1" in capsys.readouterr().err


def test_slowdown_counts_only_an_overrun_that_matters():
    from vitlab.analysis.runner import _slowdown
    planned = {"features": {"estimate_s": 10.0}, "landscape": {"estimate_s": 20.0, "replanned": {"estimate_s": 5.0}}}
    result = {"meta": {"budget": {"instruments": planned}}, "timings": {"features": 40.0, "calibration": 99.0}}
    assert _slowdown(result, 150) == pytest.approx(4.0)  # 30 s over: more than a tenth of the budget
    assert _slowdown(result, 400) == 1.0  # 30 s over 400 s: noise
    result["timings"]["landscape"] = 15.0  # replanned: its own estimate counts
    assert _slowdown(result, 150) == pytest.approx(55.0 / 15.0)


def test_exact_lanczos_steps_match_the_library_at_its_own_count():
    """The instrument runs exactly --hessian-iters steps; at 30 (the library's minimum for k <= 10)
    its spectrum is max_eigenvalue_spectrum's, and fewer steps give the Ritz values of that many."""
    import vitlab
    from vitlab.analysis.hessian import lanczos, max_eigenvalue_spectrum
    from vitlab.analysis.instruments.hessian import _spectrum
    from vitlab.analysis.landscape import soft_cross_entropy
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch4_28", depth=1, embed_dim=8, num_heads=2, in_chans=1, num_classes=10)
    batches = [(torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])),
               (torch.randn(3, 1, 28, 28), torch.tensor([4, 5, 6]))]
    want = max_eigenvalue_spectrum(model, soft_cross_entropy, batches, k=3, weight_decay=0.01, method="lanczos",
                                   max_iter=30)
    assert _spectrum(model, batches, 3, 30, 0.01) == pytest.approx(want, rel=1e-9, abs=1e-12)
    calls = []
    from vitlab.analysis import hessian as hmod
    real = hmod.hessian_vector_product
    try:
        hmod.hessian_vector_product = lambda *a, **k: calls.append(1) or real(*a, **k)
        got = _spectrum(model, batches[:1], 3, 5, 0.0)
    finally:
        hmod.hessian_vector_product = real
    assert len(calls) == 5 and len(got) == 3 and got == sorted(got, reverse=True)
