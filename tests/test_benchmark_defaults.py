"""benchmarks/defaults.py (issue 17, point 8): the CIFAR subset it trains on, the peer's time-budgeted
one-cycle schedule, what it reads from a vitlab run directory and the RESULTS.md section it writes.
The full benchmark (minutes to hours) is not run here."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bd():
    sys.path.insert(0, str(BENCH))  # defaults.py imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("bench_defaults", BENCH / "defaults.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))  # benchmark script names must not shadow anything in later tests
    return mod


def _tree(root, counts):
    """``root/<class>/<k>.png`` files (unsorted creation order) plus a non-image and a sub-folder per class."""
    for c, n in counts.items():
        d = root / c
        d.mkdir(parents=True)
        for k in reversed(range(n)):
            (d / f"{k:03d}.png").write_bytes(f"{c}{k}".encode())
        (d / "notes.txt").write_text("not an image")
        (d / "sub").mkdir()
    return root


def _links(dest):
    return sorted((c.name, f.name, os.path.realpath(f)) for c in dest.iterdir() for f in c.iterdir())


def test_subset_takes_the_first_sorted_images_of_each_class_as_links(bd, tmp_path):
    src = _tree(tmp_path / "src", {"b": 6, "a": 9, "c": 4})
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    chosen = bd.build_subset(src, tmp_path / "dst", 4)
    links = _links(tmp_path / "dst")
    assert len(links) == 12 and len({t for *_, t in links}) == 12
    for c in "abc":  # brute force: the class folder's image names, sorted, first 4
        expected = sorted(n for n in os.listdir(src / c) if n.endswith(".png"))[:4]
        assert chosen[c] == expected
        assert sorted(f for k, f, _ in links if k == c) == expected
    assert all(Path(t).parent.parent == src.resolve() and (tmp_path / "dst" / k / f).is_symlink()
               for k, f, t in links)
    bd.build_subset(src, tmp_path / "dst", 4)  # rebuilt: same links, and the source is untouched
    assert _links(tmp_path / "dst") == links
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    bd.build_subset(src, tmp_path / "dst", 2)  # a smaller subset replaces the larger one
    assert len(_links(tmp_path / "dst")) == 6


def test_subset_refuses_too_few_images_and_a_folder_without_classes(bd, tmp_path):
    src = _tree(tmp_path / "src", {"a": 5, "b": 3})
    with pytest.raises(ValueError, match="holds 3 images"):
        bd.build_subset(src, tmp_path / "dst", 4)
    with pytest.raises(ValueError, match="no class folders"):
        bd.build_subset(tmp_path / "missing", tmp_path / "dst", 1)
    with pytest.raises(ValueError, match="multiples"):
        bd.prepare_cifar(src, tmp_path / "cache", 1005, None)


def test_cifar10k_has_1000_distinct_images_per_class_and_vitlab_sees_10000(bd, tmp_path, cifar10_root):
    from vitlab.data import build_dataset_pair, dataset_info

    root = bd.prepare_cifar(cifar10_root, tmp_path, 10000, 2000)
    train, val = _links(root / "train"), _links(root / "val")
    for links, per_class, split in ((train, 1000, "train"), (val, 200, "val")):
        assert len({t for *_, t in links}) == len(links) == 10 * per_class
        assert all(sum(k == c for k, *_ in links) == per_class for c in {k for k, *_ in links})
        assert all(t.startswith(str((cifar10_root / split).resolve()) + os.sep) for *_, t in links)
    first = sorted((c, f) for c in os.listdir(cifar10_root / "train")  # brute force: sorted names, first 1000
                   for f in sorted(os.listdir(cifar10_root / "train" / c))[:1000])
    assert [(k, f) for k, f, _ in train] == first
    info = dataset_info(str(root))
    tr, va, classes = build_dataset_pair(str(root))
    assert (info["img_size"], info["in_chans"], info["num_images"], len(tr), len(va)) == (32, 3, 10000, 10000, 2000)
    assert classes == sorted(os.listdir(cifar10_root / "train"))
    full = bd.prepare_cifar(cifar10_root, tmp_path, 1000, None)  # no --val-images: the real val split, linked
    assert (full / "val").is_symlink() and os.path.realpath(full / "val") == str((cifar10_root / "val").resolve())


class _Clock:
    """Fake clock: the k-th reading after the first has advanced by ``durations[k - 1]``; train_peer reads it
    once before training and once after each step, so ``durations`` are the steps' times."""

    def __init__(self, durations):
        self.durations, self.calls, self.now = list(durations), 0, 0.0

    def __call__(self):
        if self.calls:
            self.now += self.durations[self.calls - 1]
        self.calls += 1
        return self.now


def _tiny_peer():
    from vit_pytorch import ViT

    model = ViT(image_size=8, patch_size=4, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=16, dim_head=8)
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2,))) for _ in range(3)]  # re-read every "epoch"
    return model, batches


@pytest.mark.parametrize("later, steps, seconds, finished", [
    (0.125, 50, 6.625, True),    # steady: 20 timed steps (2.875 s), then the 30 one-cycle steps that fit in 3.75 s
    (0.25, 35, 6.625, False),    # slower later: stopped at the budget, mid-schedule
    (0.0625, 50, 4.75, True),    # faster later: the planned schedule ends early
])
def test_peer_one_cycle_fills_the_budget_and_stops_at_it(bd, later, steps, seconds, finished):
    model, batches = _tiny_peer()
    # step times are binary fractions, so the sums are exact; the first step (loader start-up) is left out
    # of the step time: 0.125 s from steps 2-20
    clock = _Clock([0.5] + [0.125] * 19 + [later] * 100)
    out = bd.train_peer(model, batches, 6.625, torch.device("cpu"), clock=clock)
    assert out["planned"] == 50 and out["steps"] == steps and out["images"] == 2 * steps
    assert out["train_s"] == seconds
    final = bd.PEER_OPT["max_lr"] / bd.DIV_FACTOR / 1e4  # OneCycleLR's last lr: initial / final_div_factor
    assert (out["lr_last"] == pytest.approx(final, rel=1e-6)) == finished
    # the planning rule: whole steps of the measured time that fit in what is left
    assert bd.schedule_length(2.875, 0.125, 6.625) == 30 and bd.schedule_length(7.0, 0.125, 6.625) == 0


def test_peer_budget_shorter_than_the_timing_steps_stops_without_a_schedule(bd):
    model, batches = _tiny_peer()
    out = bd.train_peer(model, batches, 0.6, torch.device("cpu"), clock=_Clock([0.125] * 40))
    lr0 = bd.PEER_OPT["max_lr"] / bd.DIV_FACTOR
    assert (out["steps"], out["planned"], out["lr_last"]) == (5, None, pytest.approx(lr0))


def test_vitlab_side_gets_no_flag_but_data_out_and_no_progress(bd, tmp_path):
    cmd = bd.vitlab_command("/data/x", tmp_path / "run", quick=False)
    assert cmd[1:] == ["-m", "vitlab", "train", "--data", "/data/x", "--out", str(tmp_path / "run"), "--no-progress"]
    assert bd.vitlab_command(None, tmp_path, quick=True)[4:] == ["--out", str(tmp_path), "--no-progress",
                                                                  "--epochs", "1"]
    args = bd.parse_args(["--quick"])
    assert (args.images, args.val_images, args.no_write) == (1000, 1000, True)
    args = bd.parse_args([])
    assert (args.images, args.val_images, args.no_write, args.data) == (10000, None, False, ["cifar10k", "digits"])


def test_read_run_times_training_only_and_counts_the_chosen_model(bd, tmp_path):
    import yaml

    import vitlab

    kwargs = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=32, in_chans=3, num_classes=10)
    epochs = [dict(epoch=0, epoch_seconds=3.5, images_per_second=100.0), dict(epoch=1, epoch_seconds=4.0,
                                                                                images_per_second=75.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (tmp_path / "summary.json").write_text(json.dumps(dict(top1=61.5, steps=20, amp="none", wall_seconds=99.0)))
    (tmp_path / "config.json").write_text(json.dumps(dict(architecture="vit_tiny_patch4_28", model_args=kwargs)))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(
        epochs=2, opt="adamw", sched="cosine", threads=None, workers=1,
        resolved=dict(global_batch=32, lr=2e-3, device="cpu"))))
    got = bd.read_run(tmp_path)
    params = sum(p.numel() for p in vitlab.create_model("vit_tiny_patch4_28", **kwargs).parameters())
    assert (got["top1"], got["train_s"], got["images"], got["epochs"]) == (61.5, 7.5, 650, 2)
    assert (got["params"], got["workers"], got["threads"], got["device"]) == (params, 1, None, "cpu")


def test_results_section_replaces_only_its_own_block(bd, tmp_path, monkeypatch):
    _common = sys.modules["_common"]  # the module defaults.py writes through
    others = ("# results\n\nintro\n\n<!-- begin:bf16 -->\n## bf16\n\nkeep me\n<!-- end:bf16 -->\n\n"
              "<!-- begin:defaults_quick -->\n## q\n\nkeep too\n<!-- end:defaults_quick -->\n")
    path = tmp_path / "RESULTS.md"
    path.write_text(others + "\n<!-- begin:defaults -->\n## old\n\nold table\n<!-- end:defaults -->\n\ntail\n")
    monkeypatch.setattr(_common, "RESULTS", path)
    bd.publish(bd.parse_args(["--quick"]), "smoke table")  # --quick writes nothing
    assert "old table" in path.read_text()
    for body in ("first table", "second table"):
        bd.publish(bd.parse_args([]), body)
    text = path.read_text()
    assert text.startswith(others) and text.endswith("<!-- end:defaults -->\n\ntail\n")
    assert text.count("<!-- begin:defaults -->") == 1 and "second table" in text
    assert "first table" not in text and "old table" not in text and f"## {bd.TITLE}" in text
    path.write_text(others)  # no section yet: appended after the others
    bd.publish(bd.parse_args([]), "new table")
    assert path.read_text().startswith(others) and path.read_text().rstrip().endswith("<!-- end:defaults -->")
