"""``vitlab study``: every study runs end to end with ``--quick`` (on a tiny synthetic ImageFolder)
and writes its verdict table with every row, every figure, ``study.json`` and a self-contained
``report.html``; the verdict rules give the right verdict on synthetic numbers; bad input is a
one-line error.  No accuracy or time assertions."""
import json
import math
import os

import pytest
import torch

from vitlab.cli import main
from vitlab.studies import STUDIES, UNAVAILABLE, get_study
from vitlab.studies import anti_oversmoothing as aos
from vitlab.studies import focused_linear as fl
from vitlab.studies import lipsformer_no_warmup as lw
from vitlab.studies import msa_vs_conv as mc
from vitlab.studies import small_data as sd
from vitlab.studies.common import late_mean, subset_folder
from vitlab.studies.flatten_measures import dwc_band, log_slope, numerical_rank
from vitlab.studies.report import accuracy_tolerance, all_hold, better, not_worse


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 classes x (5 train, 3 val) random 32 x 32 PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 5), ("val", 3)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(a).save(d / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_study_end_to_end(name, folder, tmp_path, capsys):
    out = tmp_path / name
    assert main(["study", name, "--quick", "--data", folder, "--out", str(out)]) == 0
    study = get_study(name)
    result = json.loads((out / "study.json").read_text())
    expected = [r["claim"] for r in _empty_verdicts(study)]
    assert [r["claim"] for r in result["verdicts"]] == expected  # every row, in order
    for row in result["verdicts"]:
        assert set(row["values"]) == set(result["models_order"]) and row["holds"] in (True, False, None)
    assert ("verdict_table.png", "verdict table") in [tuple(f) for f in result["figures"]]
    assert len(result["figures"]) >= 2  # a paper-style figure besides the table
    for fig, _ in result["figures"]:
        assert (out / fig).stat().st_size > 1000, fig
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= len(result["figures"]) and 'src="http' not in page
    assert result["data"]["train_images"] == 40 and result["meta"]["quick"] is True
    assert set(result["numbers"]) == set(result["models_order"])
    assert all(result["numbers"][m].get("top1") is not None for m in result["models_order"])
    printed = capsys.readouterr().out
    assert printed.count("\n") >= len(expected) and "report:" in printed


def _empty_verdicts(study):
    if study is fl:
        return fl.verdicts({}, 100, 16)
    return study.verdicts({}, 100)


def test_verdict_rules():
    v = {"a": 2.0, "b": 1.0, "c": None, "d": math.inf}
    assert better(v, "a", "b") is True and better(v, "b", "a") is False
    assert better(v, "b", "a", higher=False) is True and better(v, "a", "b", margin=1.5) is False
    assert better(v, "a", "c") is None and better(v, "a", "d") is None
    assert not_worse(v, "b", "a", tolerance=1.0) is True and not_worse(v, "b", "a", tolerance=0.5) is False
    assert all_hold([True, True]) is True and all_hold([True, None]) is None and all_hold([None, False]) is False
    assert accuracy_tolerance(50.0, 100) == pytest.approx(10.0) and accuracy_tolerance(None, 400) == pytest.approx(5.0)


def _holds(rows):
    return {r["claim"]: r["holds"] for r in rows}


def test_anti_oversmoothing_verdicts_on_synthetic_numbers():
    good = {"vit": dict(hc_dc_late=1.0, cos_sim_late=0.8, collapse_late=0.9, top1=50.0),
            "attnscale": dict(hc_dc_late=2.0, cos_sim_late=0.5, collapse_late=0.6, top1=50.0),
            "featscale": dict(hc_dc_late=1.5, cos_sim_late=0.4, collapse_late=0.7, top1=51.0)}
    assert all(_holds(aos.verdicts(good, 1000)).values())
    bad = {"vit": dict(hc_dc_late=2.0, cos_sim_late=0.4, collapse_late=0.5, top1=60.0),
           "attnscale": dict(hc_dc_late=1.0, cos_sim_late=0.5, collapse_late=0.6, top1=40.0),
           "featscale": dict(hc_dc_late=1.0, cos_sim_late=0.8, collapse_late=0.9, top1=30.0)}
    assert not any(_holds(aos.verdicts(bad, 1000)).values())
    assert all(h is None for h in _holds(aos.verdicts({}, 1000)).values())


def test_focused_linear_verdicts_on_synthetic_numbers():
    good = {"softmax": dict(top1=50.0, rank=65.0, rank_dwc=65.0, entropy_norm=0.6, time_slope=1.8, memory_slope=1.9),
            "linear": dict(top1=40.0, rank=16.0, rank_dwc=16.0, entropy_norm=0.95, time_slope=1.0, memory_slope=1.0),
            "focused": dict(top1=50.5, rank=16.0, rank_dwc=65.0, entropy_norm=0.7, time_slope=1.0, memory_slope=1.0),
            "focused_p1": dict(top1=45.0), "focused_nodwc": dict(top1=44.0)}
    assert all(_holds(fl.verdicts(good, 1000, 16)).values())
    bad = {"softmax": dict(top1=60.0, rank=30.0, rank_dwc=65.0, entropy_norm=0.6, time_slope=1.0, memory_slope=1.0),
           "linear": dict(top1=55.0, rank=40.0, rank_dwc=16.0, entropy_norm=0.5, time_slope=1.0, memory_slope=1.0),
           "focused": dict(top1=40.0, rank=16.0, rank_dwc=20.0, entropy_norm=0.7, time_slope=1.9, memory_slope=1.9),
           "focused_p1": dict(top1=45.0), "focused_nodwc": dict(top1=44.0)}
    assert not any(_holds(fl.verdicts(bad, 1000, 16)).values())


def test_lipsformer_verdicts_on_synthetic_numbers():
    good = {"vit_warmup": dict(top1=50.0, loss_spikes=0, diverged=False, log10_lipschitz_bound=math.inf),
            "vit_no_warmup": dict(top1=30.0, loss_spikes=5, diverged=False, log10_lipschitz_bound=math.inf),
            "lipsformer_warmup": dict(top1=48.0, loss_spikes=1, diverged=False, log10_lipschitz_bound=3.0),
            "lipsformer_no_warmup": dict(top1=49.0, loss_spikes=1, diverged=False, log10_lipschitz_bound=3.5)}
    assert all(_holds(lw.verdicts(good, 1000)).values())
    bad = {"vit_warmup": dict(top1=50.0, loss_spikes=2, diverged=False, log10_lipschitz_bound=2.0),
           "vit_no_warmup": dict(top1=51.0, loss_spikes=1, diverged=False, log10_lipschitz_bound=2.0),
           "lipsformer_warmup": dict(top1=48.0, loss_spikes=1, diverged=False, log10_lipschitz_bound=math.inf),
           "lipsformer_no_warmup": dict(top1=20.0, loss_spikes=9, diverged=True, log10_lipschitz_bound=math.inf)}
    assert not any(_holds(lw.verdicts(bad, 1000)).values())
    assert lw.loss_spikes([1.0] * 12 + [2.0, 1.0, float("nan")]) == 2
    assert lw.loss_spikes([1.0, 5.0, 1.0]) == 0  # no spike before a full window


def test_msa_vs_conv_verdicts_on_synthetic_numbers():
    good = {"vit": dict(hf_change_attn=-0.5, var_change_attn=-0.2, hessian_max_abs=10.0, hessian_negative_mass=0.3,
                        noise_high_freq_delta=-1.0, top1=40.0),
            "resnet": dict(hf_change_conv=0.5, var_change_conv=0.3, hessian_max_abs=100.0, hessian_negative_mass=0.05,
                           noise_high_freq_delta=-10.0, top1=50.0),
            "alternet": dict(hf_change_attn=-0.1, hf_change_conv=0.2, var_change_attn=-0.1, var_change_conv=0.1,
                             top1=51.0)}
    assert all(_holds(mc.verdicts(good, 1000)).values())
    flipped = {m: {k: (-v if k != "top1" and k != "hessian_max_abs" and k != "hessian_negative_mass" else v)
                   for k, v in d.items()} for m, d in good.items()}
    flipped["vit"].update(hessian_max_abs=1000.0, hessian_negative_mass=0.0)
    flipped["alternet"]["top1"] = 20.0
    assert not any(_holds(mc.verdicts(flipped, 1000)).values())


def test_small_data_verdicts_on_synthetic_numbers():
    good = {"vit": dict(top1=40.0, entropy_norm=0.9, distance_px=12.0), "spt": dict(top1=42.0, entropy_norm=0.9,
                                                                                   distance_px=11.0),
            "lsa": dict(top1=41.0, entropy_norm=0.8, distance_px=10.0),
            "sl": dict(top1=43.0, entropy_norm=0.7, distance_px=9.0), "cct": dict(top1=50.0)}
    assert all(_holds(sd.verdicts(good, 1000)).values())
    bad = {"vit": dict(top1=45.0, entropy_norm=0.7, distance_px=9.0), "spt": dict(top1=44.0, entropy_norm=0.8,
                                                                                 distance_px=10.0),
           "lsa": dict(top1=43.0, entropy_norm=0.8, distance_px=10.0),
           "sl": dict(top1=42.0, entropy_norm=0.9, distance_px=11.0), "cct": dict(top1=40.0)}
    assert not any(_holds(sd.verdicts(bad, 1000)).values())
    good["sl"]["top1"] = 41.5  # beats vit and lsa but not spt: together is not the best
    assert _holds(sd.verdicts(good, 1000))["SPT and LSA together improve it most"] is False
    assert all(h is None for h in _holds(sd.verdicts({}, 1000)).values())


def test_small_data_attention_measures_average_heads_then_blocks():
    stats = {"entropy": [[1.0, 3.0], [2.0, 2.0]], "entropy_uniform": [2.0, 4.0], "distance_px": [[4.0, 8.0], None]}
    m = sd.attention_measures(stats)
    assert m["curves"] == {"entropy": [2.0, 2.0], "entropy_norm": [1.0, 0.5], "distance_px": [6.0, None]}
    assert m["numbers"] == {"entropy": 2.0, "entropy_norm": 0.75, "distance_px": 6.0}


def test_small_data_models_share_one_transformer_size():
    """The five models differ only in stem, LSA and pooling: their blocks have equal parameter counts,
    and CCT runs without its recipe's dropout and stochastic depth, as the ViTs."""
    from vitlab import create_model
    from vitlab.studies.common import Context

    s = sd.settings(Context("small_data", "/tmp/unused", "digits"))
    counts, models = {}, {}
    for label, name in sd.MODELS.items():
        with torch.device("meta"):
            models[label] = create_model(name, **sd.model_kwargs(label, s))
        counts[label] = sum(p.numel() for p in models[label].blocks.parameters())
    lsa_temps = s["model_kwargs"]["depth"] * s["model_kwargs"]["num_heads"]  # LSA: a learned temperature per head
    assert counts["vit"] == counts["spt"] == counts["cct"]
    assert counts["lsa"] == counts["sl"] == counts["vit"] + lsa_temps
    assert all(m.p == 0 for m in models["cct"].modules() if isinstance(m, torch.nn.Dropout))
    assert not any(type(m).__name__ == "DropPath" for m in models["cct"].modules())


def test_block_changes_compare_same_size_maps_only():
    feats = {"high_freq": [-3.0, -2.0, -2.5, -1.0], "kinds": ["embed", "conv", "attn", "conv"],
             "shapes": [(8, 8, 8), (8, 8, 8), (8, 8, 8), (8, 4, 4)]}
    assert mc.block_changes(feats, "high_freq") == {"conv": 1.0, "attn": -0.5}
    feats["variance"] = [1.0, math.e, 1.0, 5.0]
    assert mc.block_changes(feats, "variance", log_ratio=True) == pytest.approx({"conv": 1.0, "attn": -1.0})


def test_rank_helpers():
    assert dwc_band(torch.tensor([[0.0, 0, 0], [0, 2.0, 0], [0, 0, 0]]), (3, 3), 1).equal(
        torch.block_diag(torch.zeros(1, 1), 2 * torch.eye(9)).double())
    band = dwc_band(torch.ones(3, 3), (2, 3))
    assert band[0].tolist() == [1, 1, 0, 1, 1, 0]  # corner: taps off the map (and across rows) dropped
    q, k = torch.rand(2, 20, 4), torch.rand(2, 20, 4)
    a = q @ k.transpose(-1, -2)
    a = (a / a.sum(-1, keepdim=True)).float()
    assert numerical_rank(a).tolist() == [4, 4]
    assert numerical_rank(torch.eye(20).expand(2, 20, 20)).tolist() == [20, 20]
    assert log_slope([10, 100, 1000], [1.0, 4.0, 400.0]) == pytest.approx(2.0)
    assert log_slope([10], [1.0]) is None
    assert late_mean([1.0, None, 2.0, 4.0, float("nan"), 6.0]) == pytest.approx(6.0)
    assert late_mean([1.0, 2.0, 3.0], frac=1.0) == pytest.approx(2.0)


def test_subset_folder_is_seeded_balanced_and_reused(folder, tmp_path):
    a = subset_folder(folder, str(tmp_path / "a"), 3, 2, seed=1)
    subset_folder(folder, str(tmp_path / "b"), 3, 2, seed=1)
    assert (a["train_images"], a["val_images"]) == (30, 20)
    files = lambda d: sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)  # noqa
    assert files(str(tmp_path / "a" / "train")) == files(str(tmp_path / "b" / "train"))
    assert all(os.path.islink(os.path.join(tmp_path, "a", "train", p)) for p in files(str(tmp_path / "a" / "train")))
    c = subset_folder(folder, str(tmp_path / "c"), 3, 2, seed=2)
    assert files(str(tmp_path / "c" / "train")) != files(str(tmp_path / "a" / "train"))
    assert subset_folder(folder, str(tmp_path / "a"), 3, 2, seed=1) == a  # reused as it is
    assert c["train_images"] == 30


@pytest.mark.parametrize("argv, needle", [
    (["study", "anti_oversmooth"], "'anti_oversmooth'"),
    (["study", "small_dta"], "did you mean small_data"),
    (["study", "focused_linear", "--epochs", "0"], "--epochs '0': expected an integer >= 1"),
    (["study", "focused_linear", "--epochs", "many"], "--epochs 'many': expected an integer >= 1"),
    (["study", "focused_linear", "--seed", "-1"], "--seed '-1'"),
    (["study"], "--list"),
    (["study", "focused_linear", "--quick", "--data", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_input_is_one_line_error(argv, needle, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitlab study: error:") and needle in err


def test_list_names_every_study_and_its_cost(capsys):
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    for name in list(STUDIES) + list(UNAVAILABLE):
        assert name in out
    assert out.count("cost:") == len(STUDIES) + len(UNAVAILABLE) and ("unavailable" in out) == bool(UNAVAILABLE)
