"""Training engine: optimiser groups, schedules, config/recipes, loop outputs, accumulation,
non-finite loss, CLI errors (vitlab.engine)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import brightness_folder
from PIL import Image

import vitlab
from vitlab.engine import TrainConfig, TrainingDiverged, train
from vitlab.engine.config import list_recipes, resolve_config
from vitlab.engine.optim import build_optimizer, build_scheduler, layer_ids, param_groups

TINY = dict(embed_dim=16, depth=2, num_heads=2, patch_size=4, mlp_ratio=2.0)


def tiny_cfg(data, out, **kw):
    cfg = TrainConfig(model="vit_tiny_patch4_32", model_kwargs=dict(TINY), data=data, img_size=8, out=str(out),
                      epochs=2, batch_size=4, lr=1e-2, warmup_epochs=0, progress=False, crop="none", hflip=0.0, crop_pct=1.0,
                      threads=1, workers=0, amp="none")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return brightness_folder(tmp_path_factory.mktemp("imgs"), {"train": (8, 8), "val": (8, 8)}, seed=0, noise=30)


def _tiny_model():
    return vitlab.create_model("vit_tiny_patch4_32", **TINY, img_size=8, num_classes=2)


def test_param_groups_skip_weight_decay_exactly_for_no_weight_decay():
    m = _tiny_model()
    skip = m.no_weight_decay()
    assert "pos_embed" in skip and "cls_token" in skip
    groups = param_groups(m, 0.05)
    by_id = {id(p): n for n, p in m.named_parameters()}
    no_wd = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    wd = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert no_wd == skip and wd == set(by_id.values()) - skip
    # LipsFormer's variant: the 1-D group gets its own (small) decay
    g2 = param_groups(m, 0.05, weight_decay_1d=5e-4)
    assert {by_id[id(p)] for g in g2 if g["weight_decay"] == 5e-4 for p in g["params"]} == skip


def test_layer_decay_scales_by_block_depth():
    m = _tiny_model()  # depth 2: embeddings -> 0, blocks -> 1, 2, head/norm -> 3
    ids = layer_ids(m)
    assert ids["pos_embed"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc1.weight"] == 2
    assert ids["head.weight"] == 3
    opt = build_optimizer(m, "adamw", 1e-3, 0.05, layer_decay=0.5)
    scale = {}
    by_id = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[by_id[id(p)]] = g["lr_scale"]
    assert scale["pos_embed"] == 0.5 ** 3 and scale["blocks.0.norm1.weight"] == 0.5 ** 2
    assert scale["blocks.1.attn.qkv.weight"] == 0.5 and scale["head.bias"] == 1.0


def test_adamw_is_fused_and_steps_like_the_unfused_reference():
    """build_optimizer picks torch's fused AdamW kernel on CPU; ten steps on the same gradients
    (per-group weight decay and layer-decay lr) give the weights of the for-loop AdamW."""
    torch.manual_seed(0)
    m, ref = _tiny_model(), _tiny_model()
    ref.load_state_dict(m.state_dict())
    head0 = m.head.weight.detach().clone()
    opt = build_optimizer(m, "adamw", 3e-3, 0.05, layer_decay=0.7)
    assert all(g["fused"] for g in opt.param_groups)
    twin = {id(p): q for p, q in zip(m.parameters(), ref.parameters())}
    ref_opt = torch.optim.AdamW([{"params": [twin[id(p)] for p in g["params"]], "lr": 3e-3 * g["lr_scale"],
                                  "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                                fused=False, foreach=False)
    for g in opt.param_groups:
        g["lr"] = 3e-3 * g["lr_scale"]  # what the scheduler sets
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
            twin[id(p)].grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    assert (m.head.weight - head0).abs().max() > 1e-3  # the steps moved the weights


@pytest.mark.parametrize("warmup", [0, 4])
def test_cosine_schedule_matches_closed_form(warmup):
    m = _tiny_model()
    lr, lo, wlr, total = 1e-3, 1e-5, 1e-6, 20
    opt = build_optimizer(m, "sgd", lr, 0.0)
    sched = build_scheduler(opt, TrainConfig(epochs=total // 4, warmup_epochs=warmup / 4, min_lr=lo, warmup_lr=wlr), 4)
    for t in range(total):
        sched.step_update(t)
        got = opt.param_groups[0]["lr"]
        if t < warmup:
            want = wlr + t * (lr - wlr) / warmup
        else:
            want = lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * t / total))
        assert got == pytest.approx(want, rel=1e-9), t
    if warmup == 0:
        sched.step_update(0)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)  # no warmup: full lr at the first step


def test_config_precedence_and_unknown_keys(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("epochs: 7\nlr: 0.5\nsmoothing: 0.2\n")
    cfg = resolve_config(str(rec), {"lr": 0.1, "smoothing": None})
    assert (cfg.epochs, cfg.lr, cfg.smoothing) == (7, 0.1, 0.2)
    rec.write_text("epoch: 7\n")
    with pytest.raises(ValueError, match="did you mean epochs"):
        resolve_config(str(rec), {})
    with pytest.raises(ValueError, match="warmup-epochs"):
        resolve_config(None, {"warmup_epochs": -1})
    with pytest.raises(FileNotFoundError, match="deit_small"):
        resolve_config("no_such_recipe", {})


def test_recipes_follow_the_specs():
    names = set(list_recipes())
    assert {"deit_small", "lipsformer_swin_tiny", "flatten_swin_tiny", "attnscale_deit_small", "cifar10"} <= names
    for n in names:
        cfg = resolve_config(n, {})
        assert vitlab.is_model(cfg.model), (n, cfg.model)
    lips = resolve_config("lipsformer_swin_tiny", {})
    assert lips.warmup_epochs == 0 and lips.weight_decay_1d == 5e-4 and lips.clip_grad == 5.0
    assert lips.betas == [0.9, 0.98] and lips.min_lr == 5e-6
    deit = resolve_config("deit_small", {})
    assert (deit.blr, deit.warmup_epochs, deit.drop_path, deit.mixup, deit.cutmix, deit.reprob) == \
        (5e-4, 5, 0.1, 0.8, 1.0, 0.25)
    att = resolve_config("attnscale_deit_small", {})
    assert att.blr * 1024 / 512 == pytest.approx(1e-3)  # spec: global batch 1024 -> lr 1e-3
    fl = resolve_config("flatten_swin_tiny", {})
    assert (fl.warmup_epochs, fl.warmup_lr, fl.min_lr, fl.clip_grad, fl.drop_path) == (20, 5e-7, 5e-6, 5.0, 0.2)


def test_train_writes_run_dir_and_summary_matches_independent_eval(folder, tmp_path):
    out = tmp_path / "run"
    s = train(tiny_cfg(folder, out, ema=True, ema_decay=0.9))
    for f in ("config.yaml", "metrics.jsonl", "curves.png", "reliability.png", "summary.json",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / f).is_file(), f
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and all(r["images_per_second"] > 0 for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    for k in ("top1", "top5", "nll", "ece", "epochs", "images_per_second", "wall_seconds", "ema_top1"):
        assert k in summary
    assert {k: s[k] for k in ("top1", "nll", "ece")} == {k: summary[k] for k in ("top1", "nll", "ece")}
    # independent evaluation: rebuild the model, load last.pt, normalise the PNGs by hand
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    m = _tiny_model()
    m.load_state_dict(ck["model"])
    m.eval()
    mean, std = torch.tensor(ck["data"]["mean"])[:, None, None], torch.tensor(ck["data"]["std"])[:, None, None]
    xs, ys = [], []
    for ci, c in enumerate(("dark", "light")):
        for i in range(8):
            a = torch.from_numpy(np.array(Image.open(os.path.join(folder, "val", c, f"{i}.png")))).permute(2, 0, 1)
            xs.append((a.float() / 255 - mean) / std)
            ys.append(ci)
    with torch.no_grad():
        p = m(torch.stack(xs)).softmax(-1)
    y = torch.tensor(ys)
    assert summary["top1"] == pytest.approx(100 * (p.argmax(1) == y).double().mean().item())
    assert summary["nll"] == pytest.approx(-p[torch.arange(16), y].log().mean().item(), rel=1e-4)
    assert lines[-1]["val_top1"] == summary["top1"]
    assert not all(torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])


def test_grad_accumulation_equals_the_big_batch(folder, tmp_path):
    a = train(tiny_cfg(folder, tmp_path / "a", epochs=1, batch_size=8, accum_steps=1))
    b = train(tiny_cfg(folder, tmp_path / "b", epochs=1, batch_size=4, accum_steps=2))
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a["steps"] == b["steps"] == 2
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)  # Adam amplifies rounding
    # and a different global batch really gives different weights
    train(tiny_cfg(folder, tmp_path / "c", epochs=1, batch_size=4, accum_steps=1))
    wc = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) > 1e-3


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch):
    import vitlab.engine.build as tr

    real = tr.build_model

    def poisoned(*a, **k):
        m = real(*a, **k)
        calls = {"n": 0}

        def hook(mod, inp, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 3 else out
        m.head.register_forward_hook(hook)
        return m

    monkeypatch.setattr(tr, "build_model", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"step 3 \(epoch 1, batch 3 of 4\).*last good checkpoint: .*last.pt"):
        train(tiny_cfg(folder, out, ckpt_every_steps=2))
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_bf16_autocast_trains(folder, tmp_path):
    s = train(tiny_cfg(folder, tmp_path / "bf", epochs=1, amp="bf16", channels_last=True))
    ck = torch.load(tmp_path / "bf" / "checkpoints" / "last.pt", weights_only=True)
    assert math.isfinite(s["nll"]) and all(v.dtype == torch.float32 for v in ck["model"].values()
                                           if v.is_floating_point())


def test_fp16_loss_scaling_skips_overflowing_steps_and_resumes_exactly(folder, tmp_path):
    """fp16 autocast with GradScaler on CPU: the first steps overflow at the initial scale 2^16
    (skipped, scale halved); the scale is checkpointed, and a run resumed from the epoch-1
    checkpoint ends bit-identical to the uninterrupted one (a resume that lost the scale would
    start again at 2^16 and skip other steps)."""
    ref = train(tiny_cfg(folder, tmp_path / "ref", epochs=3, batch_size=2, amp="fp16", keep_epoch_ckpts=True))
    e1 = torch.load(tmp_path / "ref" / "checkpoints" / "epoch1.pt", weights_only=True)
    last = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    assert e1["scaler"]["scale"] < 2.0 ** 16  # overflows happened and were skipped
    assert last["scaler"]["scale"] <= e1["scaler"]["scale"]
    assert math.isfinite(ref["nll"])
    assert any(not torch.equal(v, last["model"][k]) for k, v in e1["model"].items())  # not every step skipped

    res = train(tiny_cfg(folder, tmp_path / "res", epochs=3, batch_size=2, amp="fp16",
                         resume=str(tmp_path / "ref" / "checkpoints" / "epoch1.pt")))
    b = torch.load(tmp_path / "res" / "checkpoints" / "last.pt", weights_only=True)
    assert b["scaler"] == last["scaler"]
    assert all(torch.equal(last["model"][k], b["model"][k]) for k in last["model"])
    assert (res["top1"], res["nll"]) == (ref["top1"], ref["nll"])


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--recipe", "nope"], "available: "),
    (["train", "--lr", "-1"], "lr must be > 0"),
])
def test_cli_user_errors_are_one_line(argv, needle, capsys):
    from vitlab.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_choosing_another_model_drops_the_default_models_overrides():
    assert resolve_config(None, {}).model_kwargs["depth"] == 4
    assert resolve_config(None, {"model": "deit_small_patch16_224"}).model_kwargs == {}
    assert resolve_config(None, {"model": "deit_small_patch16_224", "model_kwargs": {"depth": 2}}).model_kwargs == \
        {"depth": 2}
