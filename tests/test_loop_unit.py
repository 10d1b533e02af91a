"""The step loop (``vitlab.engine.loop.train_epoch``) against a hand-written SGD loop on a tiny linear model.

SGD without momentum is sensitive to the scale of the gradient, so a loss not divided by ``accum_steps``, a
missing clip, a skipped or doubled optimizer step, or a step taken after a non-finite loss all change the
weights.  The run's collaborators (scheduler, EMA, step log, sampler, DDP) are recorders, so the tests also see
that each is called with the right step numbers.  Fast enough to be the selection of a mutation run."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vitlab.engine.loop as loop
from vitlab.engine.distributed import DistInfo

DIM, CLASSES, BS = 5, 3, 2


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, a, k))


class Loader:
    def __init__(self, batches):
        self.batches, self.sampler = batches, Recorder()

    def __iter__(self):
        return iter(self.batches)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BS, DIM, generator=g), torch.randint(0, CLASSES, (BS,), generator=g)) for _ in range(n)]


def make_run(data, spe, accum=1, lr=0.5, **cfg):
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES)
    base = dict(accum_steps=accum, batch_size=BS, channels_last=False, clip_grad=0.0, ckpt_every_steps=0,
                max_steps=0, epochs=1, cooldown_epochs=0, progress=False, log_interval=1)
    parts = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), mixup=None,
                            distill=None, criterion=nn.CrossEntropyLoss(), scheduler=Recorder(), ema=Recorder(),
                            scaler=torch.amp.GradScaler("cpu", enabled=False))
    return SimpleNamespace(cfg=SimpleNamespace(**{**base, **cfg}), parts=parts, info=DistInfo(), amp="none",
                           data=SimpleNamespace(steps_per_epoch=spe, train_loader=Loader(data)), train_model=model,
                           ddp=None, start_epoch=0, start_step=0, epoch_accum=None, global_step=0, last_good=None)


def by_hand(data, steps, accum=1, lr=0.5, clip=0.0, start=0):
    """The same SGD steps written out: mean loss per micro-batch, divided by accum, summed, clipped."""
    torch.manual_seed(0)
    m = nn.Linear(DIM, CLASSES)
    losses, correct = [], 0
    for s in range(start, start + steps):
        m.zero_grad()
        total = 0.0
        for x, y in data[s * accum:(s + 1) * accum]:
            out = m(x)
            loss = nn.functional.cross_entropy(out, y)
            (loss / accum).backward()
            total += float(loss.detach()) * len(y)
            correct += int((out.argmax(-1) == y).sum())
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        with torch.no_grad():
            for p in m.parameters():
                p -= lr * p.grad
        losses.append(total)
    return m, losses, correct


@pytest.mark.parametrize("accum", [1, 2])
def test_epoch_equals_hand_written_sgd(accum):
    data = batches(3 * accum)
    run, log = make_run(data, spe=3, accum=accum), Recorder()
    out = loop.train_epoch(run, 0, log)
    ref, losses, correct = by_hand(data, 3, accum)
    torch.testing.assert_close(run.parts.model.weight, ref.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(run.parts.model.bias, ref.bias, rtol=0, atol=1e-6)
    assert out["acc"]["loss"] == pytest.approx(sum(losses), rel=1e-6)
    assert out["acc"]["correct"] == correct and out["acc"]["n"] == 3 * accum * BS
    assert out["images"] == 3 * accum * BS and (out["stopped"], out["mid_epoch"]) == (False, False)
    assert run.global_step == 3 and run.parts.model.training
    assert [c[1] for c in run.parts.scheduler.calls] == [(1,), (2,), (3,)]
    assert [c[2]["step"] for c in run.parts.ema.calls] == [1, 2, 3]
    assert [c[1][0] for c in log.calls] == [1, 2, 3]  # global steps
    for (_, (step, epoch, loss, lr, images), _), total in zip(log.calls, losses):
        assert epoch == 0 and lr == 0.5 and images == BS * accum
        assert loss == pytest.approx(total / (BS * accum), rel=1e-6)  # mean loss per image
    assert run.data.train_loader.sampler.calls == [("set_position", (0, 0), {})]
    assert all(p.grad is None for p in run.parts.model.parameters())  # zero_grad(set_to_none) after each step


def test_resume_mid_epoch_continues_position_and_sums():
    data = batches(4 * 2)
    run = make_run(data[2 * 2:], spe=4, accum=2)  # the loader resumes at step 2: it yields the later batches
    run.start_epoch, run.start_step, run.global_step = 1, 2, 6
    run.epoch_accum = dict(loss=10.0, correct=3.0, n=8.0)
    out = loop.train_epoch(run, 1, Recorder())
    assert run.data.train_loader.sampler.calls == [("set_position", (1, 2 * 2 * BS), {})]
    assert out["acc"]["n"] == 8 + 2 * 2 * BS and out["images"] == 2 * 2 * BS
    assert out["acc"]["loss"] > 10.0 and run.global_step == 8
    other = make_run(data, spe=4, accum=2)  # another epoch than the resumed one starts from zero
    other.start_epoch, other.start_step, other.epoch_accum = 0, 2, dict(loss=10.0, correct=3.0, n=8.0)
    out = loop.train_epoch(other, 1, Recorder())
    assert other.data.train_loader.sampler.calls == [("set_position", (1, 0), {})]
    assert out["acc"]["n"] == 4 * 2 * BS and out["images"] == out["acc"]["n"]


def test_clip_grad_clips_the_total_norm():
    data = batches(4)
    run = make_run(data, spe=2, accum=2, clip_grad=0.05, lr=1.0)
    loop.train_epoch(run, 0, Recorder())
    ref, _, _ = by_hand(data, 2, accum=2, clip=0.05, lr=1.0)
    unclipped, _, _ = by_hand(data, 2, accum=2, lr=1.0)
    torch.testing.assert_close(run.parts.model.weight, ref.weight, rtol=0, atol=1e-6)
    assert (ref.weight - unclipped.weight).abs().max() > 1e-3  # the clip mattered


@pytest.mark.parametrize("max_steps,mid", [(2, True), (3, False)])
def test_max_steps_stops_and_saves_only_mid_epoch(monkeypatch, max_steps, mid):
    saved = []
    monkeypatch.setattr(loop, "save_checkpoint",
                        lambda r, name, e, s, acc: saved.append((r, name, e, s, dict(acc))) or name)
    run = make_run(batches(3), spe=3, max_steps=max_steps)
    out = loop.train_epoch(run, 0, Recorder())
    assert run.global_step == max_steps and out["stopped"] and out["mid_epoch"] == mid
    assert 0 <= out["seconds"] < 60
    assert [s[1:4] for s in saved] == ([("last.pt", 0, 2)] if mid else [])
    if mid:  # the run itself and the epoch's running sums, so that a resume continues them
        assert saved[0][0] is run and saved[0][4] == out["acc"] and saved[0][4]["n"] == 2 * BS
    assert run.last_good == ("last.pt" if mid else None)


@pytest.mark.parametrize("spe", [4, 5])
def test_checkpoint_every_steps_inside_the_epoch_only(monkeypatch, spe):
    saved = []
    monkeypatch.setattr(loop, "save_checkpoint", lambda r, name, e, s, acc: saved.append((r, name, e, s, acc["n"]))
                        or f"ck{s}")
    run = make_run(batches(spe), spe=spe, ckpt_every_steps=2)
    loop.train_epoch(run, 0, Recorder())  # the step ending the epoch: the epoch's own checkpoint covers it
    want = [("last.pt", 0, s, s * BS) for s in (2, 4) if s < spe]
    assert [s[1:] for s in saved] == want and saved[0][0] is run and run.last_good == f"ck{want[-1][2]}"


@pytest.mark.parametrize("last_good", [None, "runs/x/checkpoints/last.pt"])
def test_non_finite_loss_stops_before_the_optimizer_steps(last_good):
    data = batches(3)
    data[1] = (torch.full((BS, DIM), float("nan")), data[1][1])
    run = make_run(data, spe=3)
    run.last_good = last_good
    with pytest.raises(loop.TrainingDiverged) as err:
        loop.train_epoch(run, 0, Recorder())
    msg = str(err.value)
    assert "non-finite loss (nan) at step 2 (epoch 1, batch 2 of 3)" in msg
    assert (f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet") in msg
    ref, _, _ = by_hand(data, 1)  # the first step only: the NaN step never reached the weights
    assert run.global_step == 1
    torch.testing.assert_close(run.parts.model.weight, ref.weight, rtol=0, atol=1e-6)


def test_mixup_and_distillation_take_the_loss_and_accuracy_is_not_counted_with_mixup():
    data = batches(2)
    run = make_run(data, spe=2)
    seen = []
    run.parts.mixup = lambda x, y: (x * 0.5, nn.functional.one_hot(y, CLASSES).float())
    run.parts.distill = lambda x, logits, target: (seen.append((x, target)) or logits.sum() * 0 + 2.0, logits)
    out = loop.train_epoch(run, 0, Recorder())
    torch.testing.assert_close(seen[0][0], data[0][0] * 0.5)
    assert seen[0][1].shape == (BS, CLASSES)  # the mixed target goes to the distiller
    assert out["acc"]["correct"] == 0 and out["acc"]["loss"] == pytest.approx(2 * 2.0 * BS)


def test_ddp_syncs_on_the_last_micro_batch_only():
    events = []

    class FakeDDP:
        @contextlib.contextmanager
        def no_sync(self):
            events.append("no_sync")
            yield

    run = make_run(batches(6), spe=2, accum=3)
    run.ddp = FakeDDP()
    forward = run.train_model.forward
    run.train_model.forward = lambda x: events.append("forward") or forward(x)
    loop.train_epoch(run, 0, Recorder())
    # micro-batches 1 and 2 of each step skip the gradient sync, the third syncs
    assert events == ["no_sync", "forward", "no_sync", "forward", "forward"] * 2


def test_ema_gets_the_trained_model_and_amp_reaches_the_model():
    run = make_run(batches(2), spe=2)
    run.amp = "bf16"
    dtypes = []
    forward = run.train_model.forward
    run.train_model.forward = lambda x: dtypes.append(forward(x).dtype) or forward(x)
    loop.train_epoch(run, 0, Recorder())
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # autocast on the run's device
    assert all(c[1] == (run.parts.model,) for c in run.parts.ema.calls)


def test_clip_acts_on_unscaled_gradients_with_a_grad_scaler():
    data = batches(4)
    run = make_run(data, spe=2, accum=2, clip_grad=0.05, lr=1.0)
    run.parts.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loop.train_epoch(run, 0, Recorder())
    ref, _, _ = by_hand(data, 2, accum=2, clip=0.05, lr=1.0)
    torch.testing.assert_close(run.parts.model.weight, ref.weight, rtol=0, atol=1e-5)


def test_step_log_counts_every_rank_and_batch_one_loss():
    run = make_run([(x[:1], y[:1]) for x, y in batches(2)], spe=2, batch_size=1)
    run.info = SimpleNamespace(device=torch.device("cpu"), is_main=True, world_size=4, enabled=False, rank=0)
    log = Recorder()
    out = loop.train_epoch(run, 0, log)
    assert [c[1][4] for c in log.calls] == [4, 4]  # images per step over 4 ranks
    assert sum(c[1][2] for c in log.calls) == pytest.approx(out["acc"]["loss"], rel=1e-6)  # batch 1: mean = sum


def test_channels_last_and_progress_lines(capsys):
    seen = []

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, CLASSES, 2)

        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return self.conv(x).mean((2, 3))

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BS, 2, 3, 3, generator=g), torch.tensor([0, 1])) for _ in range(2)]
    run = make_run(data, spe=3, channels_last=True, progress=True, log_interval=2, cooldown_epochs=1)
    data.append(data[0])
    run.parts.model = run.train_model = Conv()
    run.parts.optimizer = torch.optim.SGD(run.train_model.parameters(), lr=0.1)
    loop.train_epoch(run, 0, Recorder())
    assert seen == [True, True, True]
    lines = capsys.readouterr().err.strip().splitlines()  # every 2nd step and the last; epochs + cooldown
    assert [line.split(" loss")[0] for line in lines] == ["epoch 1/2 step 2/3", "epoch 1/2 step 3/3"]
    for is_main, progress in [(False, True), (True, False)]:  # other ranks and --no-progress print nothing
        run = make_run(data, spe=3, progress=progress)
        run.parts.model = run.train_model = Conv()
        run.parts.optimizer = torch.optim.SGD(run.train_model.parameters(), lr=0.1)
        run.info = SimpleNamespace(device=torch.device("cpu"), is_main=is_main, world_size=1, enabled=False)
        loop.train_epoch(run, 0, Recorder())
        assert capsys.readouterr().err == ""
