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


@pytest.mark.parametrize("n_bins", [4, 7, 10, 15])
def test_confidences_on_every_bin_edge_match_brute_force(n_bins):
    """Convention (vitlab.engine.metrics): float64 edges linspace(0, 1, n+1), bins (start, end];
    a confidence equal to an inner edge belongs to the lower bin, 0 to the first, 1 to the last.
    Every edge is hit by two samples (one right, one wrong) plus one mid-bin sample per bin."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist()
    mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    confs = [e for e in edges for _ in range(2)] + mids
    labels = [i % 2 for i in range(2 * len(edges))] + [0] * len(mids)
    probs = torch.tensor([[c, 0.0] for c in confs], dtype=torch.float64)  # top label 0, confidence c
    m = calibration_metrics(probs, torch.tensor(labels), n_bins=n_bins)
    b = reliability_bins(probs, torch.tensor(labels), n_bins)
    # brute force: membership by explicit comparisons with the documented edges
    count, ece, sece = [0] * n_bins, 0.0, 0.0
    for j in range(n_bins):
        lo, hi = edges[j], edges[j + 1]
        idx = [i for i, c in enumerate(confs) if lo < c <= hi or (j == 0 and c == lo)]
        count[j] = len(idx)
        acc = sum(labels[i] == 0 for i in idx) / len(idx)
        conf = sum(confs[i] for i in idx) / len(idx)
        ece += len(idx) / len(confs) * abs(acc - conf)
        sece += len(idx) / len(confs) * (conf - acc)
    assert b["count"].tolist() == count
    # first bin: 0 (x2), its upper edge (x2), its mid; last bin: its upper edge 1 (x2) and its mid
    assert count[0] == 5 and count[-1] == 3 and all(c == 3 for c in count[1:-1])
    assert m["ece"] == pytest.approx(ece, abs=1e-12)
    assert m["signed_ece"] == pytest.approx(sece, abs=1e-12)
    assert expected_calibration_error(probs, torch.tensor(labels), n_bins) == pytest.approx(ece, abs=1e-12)


def test_engine_uses_engine_metrics_and_never_imports_analysis():
    """engine must not import vitlab.analysis (analysis may import engine); the metrics moved to
    vitlab.engine.metrics and are re-exported unchanged from vitlab.analysis.calibration."""
    import ast
    from pathlib import Path

    import vitlab.analysis.calibration as ac
    import vitlab.engine.metrics as em

    for name in ("calibration_metrics", "expected_calibration_error", "reliability_bins", "plot_reliability_diagram"):
        assert getattr(ac, name) is getattr(em, name)
    engine = Path(em.__file__).parent
    for path in sorted(engine.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.startswith("vitlab.analysis") for m in mods), f"{path.name} imports {mods}"
