"""The engine does what its flags say (issue 18): bf16 is the compute dtype inside the model,
the compiled graph runs, augmentation changes between epochs, the best checkpoint is the best,
--clip-grad clips, --max-steps stops (resumably), --eval-every skips evaluations, and the
gradient-accumulation equivalence holds under SGD (which, unlike Adam, sees a wrongly scaled loss)."""
import json

import pytest
import torch
from conftest import brightness_folder
from test_engine import tiny_cfg

import vitlab.engine.build as build
import vitlab.engine.trainer as trainer
from vitlab.engine import train
from vitlab.engine.amp import resolve_amp


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return brightness_folder(tmp_path_factory.mktemp("imgs"), {"train": (8, 8), "val": (2, 2)}, seed=0, noise=30)


def _spy_model(monkeypatch, hook):
    real = build.build_model

    def spied(*a, **k):
        m = real(*a, **k)
        hook(m)
        return m
    monkeypatch.setattr(build, "build_model", spied)


@pytest.mark.parametrize("amp, want", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_amp_sets_the_compute_dtype_inside_the_model_while_training(folder, tmp_path, monkeypatch, amp, want):
    seen = []

    def hook(m):
        def record(mod, inp, out):
            if mod.training:
                seen.append((out.dtype, mod.weight.dtype))
        m.blocks[0].mlp.fc1.register_forward_hook(record)
        m.head.register_forward_hook(record)
    _spy_model(monkeypatch, hook)
    train(tiny_cfg(folder, tmp_path / amp, epochs=1, amp=amp))
    assert len(seen) == 2 * 4  # two layers, four training steps
    assert {d for d, _ in seen} == {want} and {w for _, w in seen} == {torch.float32}  # weights stay float32


def test_amp_auto_is_bf16_exactly_on_native_bf16_cpus_for_wide_models(monkeypatch):
    import vitlab.engine.amp as amp

    cpu = torch.device("cpu")
    wide, narrow = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    wide.num_features, narrow.num_features = 384, 64
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("auto", cpu, wide) == "bf16" and resolve_amp("none", cpu, wide) == "none"
    assert resolve_amp("auto", cpu, narrow) == "none" and resolve_amp("bf16", cpu, narrow) == "bf16"
    assert resolve_amp("auto", torch.device("meta"), wide) == "none"  # not a CPU
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp("auto", cpu, wide) == "none" and resolve_amp("bf16", cpu, wide) == "bf16"


def test_compile_runs_the_compiled_graph_for_every_training_step(folder, tmp_path, monkeypatch):
    """A counting dynamo backend (the captured graph run as is, so the weights must equal eager's):
    --compile that is ignored, or a compiled module that the loop does not call, counts zero."""
    calls = {"compiled": 0, "run": 0}
    real_compile = torch.compile

    def backend(gm, example_inputs):
        calls["compiled"] += 1

        def run(*args):
            calls["run"] += 1
            return gm.forward(*args)
        return run

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend))
    torch._dynamo.reset()
    s = train(tiny_cfg(folder, tmp_path / "c", epochs=1, compile=True))
    assert calls["compiled"] >= 1 and calls["run"] >= s["steps"] == 4
    train(tiny_cfg(folder, tmp_path / "e", epochs=1, compile=False))
    assert calls["run"] >= 4  # unchanged by the eager run
    a = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "e" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_augmentation_differs_between_epochs_inside_training(folder, tmp_path, monkeypatch):
    """Random resized crops of the same images: epoch 2 must not replay epoch 1's crops."""
    inputs = []

    def hook(m):
        m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()) if mod.training else None)
    _spy_model(monkeypatch, hook)
    train(tiny_cfg(folder, tmp_path / "aug", epochs=2, crop="rrc", batch_size=16))
    assert len(inputs) == 2 and inputs[0].shape[0] == 16
    e0, e1 = inputs
    replayed = sum(any(torch.equal(row, other) for other in e0) for row in e1)
    assert replayed < 4, f"{replayed} of 16 epoch-2 samples repeat an epoch-1 augmentation exactly"


def _scripted_predict(monkeypatch, script):
    """Validation returns scripted probabilities: (correct?, probability of the true class) per image."""
    calls = []

    def fake(model, loader, device, info=None, amp="none", channels_last=False):
        rows = script[len(calls)]
        calls.append(1)
        t = torch.tensor([i % 2 for i in range(len(rows))])
        p = torch.empty(len(rows), 2)
        for i, (ok, q) in enumerate(rows):
            q = q if ok else min(q, 0.49)
            p[i, t[i]], p[i, 1 - t[i]] = q, 1 - q
        return p, t
    monkeypatch.setattr(trainer, "predict", fake)
    return calls


# epoch 1: 50 %, NLL 0.71; epoch 2: 100 %, NLL 0.60; epoch 3: 75 %, NLL 0.21
SCRIPT = [[(1, .6), (1, .6), (0, .4), (0, .4)], [(1, .55)] * 4, [(1, .99)] * 3 + [(0, .45)]]


@pytest.mark.parametrize("metric, best_epoch", [("top1", 2), ("nll", 3)])
def test_best_checkpoint_is_the_best_epoch_by_the_chosen_metric(folder, tmp_path, monkeypatch, metric, best_epoch):
    _scripted_predict(monkeypatch, SCRIPT)
    out = tmp_path / metric
    train(tiny_cfg(folder, out, epochs=3, eval_metric=metric, keep_epoch_ckpts=True, checkpoint_hist=2))
    ck = out / "checkpoints"
    best = torch.load(ck / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch
    ref = torch.load(ck / f"epoch{best_epoch}.pt", weights_only=True)
    assert all(torch.equal(best["model"][k], v) for k, v in ref["model"].items())
    kept = sorted(p.name for p in ck.glob("best-epoch*.pt"))
    assert kept == (["best-epoch2.pt", "best-epoch3.pt"] if metric == "top1" else ["best-epoch2.pt", "best-epoch3.pt"])
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_top1"] for r in hist] == [50.0, 100.0, 75.0]


def test_checkpoint_hist_drops_the_worst(folder, tmp_path, monkeypatch):
    _scripted_predict(monkeypatch, [SCRIPT[1], SCRIPT[0], SCRIPT[2]])  # 100, 50, 75 %
    train(tiny_cfg(folder, tmp_path / "h", epochs=3, checkpoint_hist=2))
    assert sorted(p.name for p in (tmp_path / "h" / "checkpoints").glob("best-epoch*.pt")) == \
        ["best-epoch1.pt", "best-epoch3.pt"]


def test_eval_every_evaluates_every_n_epochs_and_the_last(folder, tmp_path, monkeypatch):
    calls = _scripted_predict(monkeypatch, SCRIPT * 2)
    train(tiny_cfg(folder, tmp_path / "ev", epochs=3, eval_every=2))
    hist = [json.loads(line) for line in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in hist] == [False, True, True] and len(calls) == 2


def _sgd(folder, out, **kw):
    return tiny_cfg(folder, out, opt="sgd", weight_decay=0.0, lr=0.5, sched="constant", **kw)  # timm: nesterov SGD


def test_clip_grad_bounds_the_gradient_norm_at_every_step(folder, tmp_path, monkeypatch):
    import vitlab.engine.optim as optim

    norms = {}
    real = optim.build_optimizer

    def spied(model, *a, **k):
        opt = real(model, *a, **k)
        opt.register_step_pre_hook(lambda o, args, kw: norms[key].append(
            torch.norm(torch.stack([p.grad.norm() for g in o.param_groups for p in g["params"]])).item()))
        return opt
    monkeypatch.setattr(optim, "build_optimizer", spied)
    for key, clip in (("free", None), ("clipped", 0.05)):
        norms[key] = []
        train(_sgd(folder, tmp_path / key, epochs=1, clip_grad=clip))
    assert min(norms["free"]) > 0.05  # the bound is active in this run
    assert len(norms["clipped"]) == 4 and max(norms["clipped"]) <= 0.05 * (1 + 1e-5)
    assert min(norms["clipped"]) > 0.05 * (1 - 1e-4)  # clipped to the bound, not below it


def test_max_steps_stops_mid_epoch_and_a_resume_ends_like_the_uninterrupted_run(folder, tmp_path):
    s = train(tiny_cfg(folder, tmp_path / "cut", epochs=2, max_steps=3))
    ck = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert s["steps"] == 3 and (ck["epoch"], ck["step"]) == (0, 3)
    train(tiny_cfg(folder, tmp_path / "cut", epochs=2, resume="auto"))
    train(tiny_cfg(folder, tmp_path / "ref", epochs=2))
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (b["epoch"], b["step"]) == (2, 0) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    hist = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in hist] == [0, 1] and hist[-1]["step"] == 8


def test_grad_accumulation_equals_the_big_batch_under_sgd(folder, tmp_path):
    """Plain SGD moves each weight by lr x gradient: a loss not divided by the micro-batch count
    (or divided twice) scales the update and fails; Adam would hide it."""
    train(_sgd(folder, tmp_path / "a", epochs=1, batch_size=8, accum_steps=1))
    train(_sgd(folder, tmp_path / "b", epochs=1, batch_size=4, accum_steps=2))
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_layer_decay_follows_the_models_group_matcher_when_it_has_one():
    """timm's contract: ``group_matcher(coarse=False)`` says which layer a parameter belongs to."""
    from torch import nn

    from vitlab.engine.optim import build_optimizer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stage = nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.fc = nn.Linear(2, 2)

        def group_matcher(self, coarse=False):
            return dict(stem=r"^stem", blocks=[(r"^stage\.(\d+)", None), (r"^fc", (99999,))])

    net = Net()
    opt = build_optimizer(net, "adamw", 1.0, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in net.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    # timm's grouping: stem 0, stage.i i + 1; the final layer (99999) joins the last group
    assert scale == {"stem.weight": .25, "stem.bias": .25, "stage.0.weight": .5, "stage.0.bias": .5,
                     "stage.1.weight": 1.0, "stage.1.bias": 1.0, "fc.weight": 1.0, "fc.bias": 1.0}
