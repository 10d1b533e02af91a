"""Calibration metrics against the spec's test vector (how_vits_work.md §9.3), torchmetrics and
brute-force recomputation."""
import sys

import pytest
import torch

from vitlab.analysis import calibration_metrics, expected_calibration_error
from vitlab.analysis.calibration import plot_reliability_diagram, reliability_bins

Y = torch.tensor([0, 1, 2, 1])
P = torch.tensor([[0.95, 0.03, 0.02], [0.10, 0.85, 0.05], [0.18, 0.72, 0.10], [0.92, 0.05, 0.03]])


pytestmark = pytest.mark.usefixtures("one_thread")


def test_spec_test_vector():
    m = calibration_metrics(P, Y, n_bins=10)
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(100.0)
    assert m["acc90"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(5 / 18, abs=1e-6)
    assert m["iou90"] == pytest.approx(0.25)
    assert m["unc90"] == pytest.approx(0.5)
    assert m["freq90"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(1.378032, abs=1e-6)
    assert m["brier"] == pytest.approx(0.78735, abs=1e-6)
    assert m["ece"] == pytest.approx(0.435, abs=1e-7)
    assert m["signed_ece"] == pytest.approx(0.36, abs=1e-7)
    assert expected_calibration_error(P, Y, n_bins=10) == pytest.approx(0.435, abs=1e-7)


def test_ece_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    for k, n_bins in [(10, 15), (4, 10), (100, 20)]:
        logits = torch.randn(500, k, generator=g) * 3
        probs = logits.softmax(1)
        labels = torch.randint(0, k, (500,), generator=g)
        ref = tm.multiclass_calibration_error(probs, labels, num_classes=k, n_bins=n_bins, norm="l1")
        assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(float(ref), abs=1e-5)
        m = calibration_metrics(probs, labels, n_bins=n_bins)
        assert m["top1"] == pytest.approx(
            100 * float(tm.multiclass_accuracy(probs, labels, num_classes=k, average="micro")), abs=1e-4)
        assert m["top5"] == pytest.approx(100 * float(tm.multiclass_accuracy(
            probs, labels, num_classes=k, average="micro", top_k=min(5, k))), abs=1e-4)
        assert m["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), abs=1e-5)


def test_brute_force_loops():
    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(200, 6, generator=g) * 2).softmax(1)
    labels = torch.randint(0, 6, (200,), generator=g)
    m = calibration_metrics(probs, labels, n_bins=7, threshold=0.5)
    # brute force with python loops
    conf = [float(p.max()) for p in probs]
    pred = [int(p.argmax()) for p in probs]
    ece = sece = 0.0
    for b in range(7):
        lo, hi = b / 7, (b + 1) / 7
        idx = [i for i in range(200) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if idx:
            acc = sum(pred[i] == int(labels[i]) for i in idx) / len(idx)
            c = sum(conf[i] for i in idx) / len(idx)
            ece += len(idx) / 200 * abs(acc - c)
            sece += len(idx) / 200 * (c - acc)
    assert m["ece"] == pytest.approx(ece, abs=1e-9)
    assert m["signed_ece"] == pytest.approx(sece, abs=1e-9)
    conf_idx = [i for i in range(200) if conf[i] > 0.5]
    assert m["freq90"] == pytest.approx(len(conf_idx) / 200)
    assert m["acc90"] == pytest.approx(sum(pred[i] == int(labels[i]) for i in conf_idx) / len(conf_idx))
    wrong = [i for i in range(200) if pred[i] != int(labels[i])]
    assert m["unc90"] == pytest.approx(sum(conf[i] <= 0.5 for i in wrong) / len(wrong))
    # IoU vs scikit-learn's jaccard (macro over present labels)
    skm = pytest.importorskip("sklearn.metrics")
    present = sorted(set(labels.tolist()))
    ref = skm.jaccard_score(labels.numpy(), probs.argmax(1).numpy(), labels=present, average="macro",
                            zero_division=0)
    assert m["iou"] == pytest.approx(ref, abs=1e-9)
    brier = sum(float(((probs[i] - torch.eye(6)[labels[i]]) ** 2).sum()) for i in range(200)) / 200
    assert m["brier"] == pytest.approx(brier, abs=1e-6)


def test_perfect_calibration_has_zero_ece():
    # all confidences 0.75 in one bin, exactly 75 % correct
    probs = torch.tensor([[0.75, 0.25]] * 8)
    labels = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(0.0, abs=1e-12)
    assert calibration_metrics(probs, labels)["acc90"] != calibration_metrics(probs, labels)["acc90"]  # nan


def test_bin_edges_are_right_closed():
    # confidence exactly 0.5 belongs to bin (0.4, 0.5] with 10 bins
    b = reliability_bins(torch.tensor([[0.5, 0.5], [0.625, 0.375]]), torch.tensor([0, 0]), 4)
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]
    assert b["count"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="shape"):
        calibration_metrics(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        calibration_metrics(P, torch.tensor([0, 1, 5, 1]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(P, Y, n_bins=0)
    with pytest.raises(ValueError, match="softmax"):
        calibration_metrics(P * 10, Y)


def test_reliability_plot_and_lazy_import(tmp_path):
    path = plot_reliability_diagram(P, Y, tmp_path / "rel.png", n_bins=10)
    assert path.exists() and path.stat().st_size > 1000
    import subprocess
    out = subprocess.run([sys.executable, "-c",
                          "import sys, vitlab.analysis as a; a.calibration_metrics; "
                          "print('matplotlib' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
