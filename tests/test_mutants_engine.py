"""Tests for mutants that survived mutmut over the engine's checkpoint and loop code (issue 18,
item 7): RNG capture and restore, atomic writes, checkpoint discovery and loading, whole-loader
prediction (with the rank interleaving of a sharded loader)."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import vitlab.engine.loop as loop
from vitlab.engine.checkpoint import atomic_save, capture_rng, find_resume_checkpoint, load_checkpoint, restore_rng
from vitlab.engine.distributed import DistInfo
from vitlab.errors import UserError


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_capture_and_restore_every_generator():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draw()
    state = capture_rng()
    assert set(state) == {"torch", "numpy", "python"}
    first = _draw()
    restore_rng(state)
    assert _draw() == first
    # through a weights-only save and load, as a checkpoint carries it
    for seed in range(100):  # a Gaussian draw leaves a cached second value in numpy's state
        np.random.seed(seed)
        np.random.randn(1)
        if abs(np.random.get_state()[4]) < 0.5:
            break
    state = capture_rng()
    assert state["numpy"][3] == 1
    first = _draw() + (np.random.randn(3).tolist(),)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    restore_rng(state)
    assert _draw() + (np.random.randn(3).tolist(),) == first


def test_atomic_save_writes_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "new" / "dir" / "last.pt"
    assert atomic_save({"model": {"w": torch.ones(2)}, "epoch": 1}, str(target)) == str(target)
    assert atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 2}, str(target)) == str(target)  # over it
    assert load_checkpoint(str(target))["epoch"] == 2
    assert os.listdir(target.parent) == ["last.pt"]
    with pytest.raises(Exception):
        atomic_save({"model": lambda: 0}, str(target))  # cannot be pickled: the old file stays, no temporary
    assert os.listdir(target.parent) == ["last.pt"] and load_checkpoint(str(target))["epoch"] == 2


def test_load_checkpoint_refuses_what_is_not_a_vitlab_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"state_dict": {}}, tmp_path / "a.pt")
    torch.save([1, 2], tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        with pytest.raises(UserError, match="no 'model' entry"):
            load_checkpoint(str(tmp_path / name))


def test_find_resume_checkpoint_is_the_newest_non_best_non_temporary(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None
    d = tmp_path / "checkpoints"
    d.mkdir()
    assert find_resume_checkpoint(str(tmp_path)) is None
    for i, name in enumerate(["epoch_1.pt", "last.pt", "epoch_2.pt", "best.pt", ".last.pt.tmp1.pt", "x.txt"]):
        (d / name).write_bytes(b"")
        os.utime(d / name, (1000 + i, 1000 + i))
    assert find_resume_checkpoint(str(tmp_path)) == str(d / "epoch_2.pt")
    os.utime(d / "last.pt", (2000, 2000))
    assert find_resume_checkpoint(str(tmp_path)) == str(d / "last.pt")


class _Logits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2 * 2 * 2, 3)
        self.formats = []

    def forward(self, x):
        self.formats.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.lin(x.flatten(1)) * 3


def test_predict_probabilities_labels_and_channels_last():
    torch.manual_seed(0)
    m = _Logits().train()
    xs, ys = torch.randn(5, 2, 2, 2), torch.tensor([0, 2, 1, 1, 0])
    loader = [(xs[:3], ys[:3]), (xs[3:], ys[3:])]
    p, t = loop.predict(m, loader, torch.device("cpu"))
    assert not m.training and m.formats == [False, False]
    torch.testing.assert_close(p, m.lin(xs.flatten(1)).mul(3).softmax(-1).detach())
    assert torch.equal(t, ys) and p.dtype == torch.float32
    loop.predict(m, loader, torch.device("cpu"), channels_last=True)
    assert m.formats[2:] == [True, True]
    p, t = loop.predict(m, [], torch.device("cpu"))
    assert p.shape == (0, 0) and t.shape == (0,) and t.dtype == torch.long
    p, t = loop.predict(m, loader, torch.device("cpu"), info=DistInfo())  # one process: nothing gathered
    assert torch.equal(t, ys)


def test_predict_interleaves_the_ranks_of_a_sharded_loader(monkeypatch):
    """Rank r holds samples r, r + w, ...: the gathered result is in data-set order."""
    m = _Logits()
    info = DistInfo(world_size=2, rank=0)
    shards = []

    def gather(obj, info):
        p, t = obj
        other = (torch.full((2, p.shape[1]), 0.5), torch.tensor([11, 13]))  # rank 1: samples 1 and 3
        shards.append(obj)
        return [obj, other]

    monkeypatch.setattr(loop, "all_gather_objects", gather)
    xs = torch.randn(3, 2, 2, 2)
    p, t = loop.predict(m, [(xs, torch.tensor([10, 12, 14]))], torch.device("cpu"), info=info)
    assert t.tolist() == [10, 11, 12, 13, 14]
    assert torch.equal(p[1], torch.full((3,), 0.5)) and torch.equal(p[3], torch.full((3,), 0.5))
    torch.testing.assert_close(p[[0, 2, 4]], shards[0][0])


def test_atomic_save_writes_its_temporary_next_to_the_target(tmp_path, monkeypatch):
    """The temporary lives in the target's directory (an os.replace across file systems is not atomic)."""
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moves.append((a, b)) or real(a, b))
    target = tmp_path / "ck" / "last.pt"
    atomic_save({"model": {}}, str(target))
    (src, dst), = moves
    assert os.path.dirname(src) == str(target.parent) and dst == str(target)
    assert os.path.basename(src).startswith(".last.pt.tmp")


def test_rng_state_covers_cuda_exactly_when_cuda_is_in_use(monkeypatch):
    """The CUDA generators are saved when CUDA is initialised and restored when the state has them
    (checked on the CPU with the CUDA calls replaced)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda-state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: calls.append(s))
    assert "cuda" not in capture_rng()  # available but unused: CUDA is not initialised for it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    state = capture_rng()
    assert state["cuda"] == ["cuda-state"]
    restore_rng(state)
    assert calls == [["cuda-state"]]
    restore_rng({k: v for k, v in state.items() if k != "cuda"})  # a checkpoint written on a CPU machine
    assert calls == [["cuda-state"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restore_rng(state)  # a GPU checkpoint resumed on a CPU machine
    assert calls == [["cuda-state"]]
