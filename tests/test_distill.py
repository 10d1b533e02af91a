"""DeiT distillation in ``vitlab train`` (``--distill hard|soft --teacher PATH``): the loss against the
hand formula, the frozen teacher, and a tiny run distilling a tiny teacher into a plain ViT and into
a distilled DeiT."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import vitlab
from vitlab.cli import main
from vitlab.engine.distill import Distiller, distillation_loss, load_teacher
from vitlab.errors import UserError


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _ce(z, y):
    return -_log_softmax(z)[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 3.0)])
def test_loss_equals_the_hand_formula(alpha, tau):
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    y = torch.randint(0, 5, (6,), generator=g)
    c, d, t, yy = cls.double().numpy(), dist.double().numpy(), teacher.double().numpy(), y.numpy()
    base = nn.CrossEntropyLoss()
    hard = distillation_loss((cls, dist), teacher, y, base, "hard", alpha, tau)
    assert float(hard) == pytest.approx((1 - alpha) * _ce(c, yy) + alpha * _ce(d, t.argmax(1)), rel=1e-5)
    soft = distillation_loss((cls, dist), teacher, y, base, "soft", alpha, tau)
    lp_t, lp_s = _log_softmax(t / tau), _log_softmax(d / tau)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum() / d.size * tau ** 2  # DeiT: summed, divided by batch x classes
    assert float(soft) == pytest.approx((1 - alpha) * _ce(c, yy) + alpha * kl, rel=1e-5)
    # a plain student: its single head for both terms
    one = distillation_loss(cls, teacher, y, base, "hard", alpha, tau)
    assert float(one) == pytest.approx((1 - alpha) * _ce(c, yy) + alpha * _ce(c, t.argmax(1)), rel=1e-5)
    assert float(distillation_loss(cls, cls, y, base, "soft", 1.0, tau)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_is_frozen_in_eval_mode_and_sees_the_student_batch():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    distiller = Distiller(teacher, nn.CrossEntropyLoss(), "soft", 0.5, 2.0)
    teacher.train()  # a caller switching it back does not matter: each call puts it in eval mode
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,))
    loss, _ = distiller(x, student(x), y)
    loss.backward()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert seen[0] is x
    out1, out2 = distiller.teacher(x), distiller.teacher(x)
    assert torch.equal(out1, out2)  # dropout off


TINY = ["--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--no-progress", "--workers", "0",
        "--log-interval", "0", "--amp", "none", "--threads", "1"]
DEIT = ["--model", "deit_tiny_distilled_patch16_224", "--model-kwargs",
        "patch_size=4,embed_dim=32,depth=1,num_heads=2"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill") / "teacher")
    assert main(["train", "--out", out] + TINY) == 0
    return out


def test_distill_end_to_end_plain_and_deit_student(teacher_run, tmp_path, capsys):
    from vitlab.engine.checkpoint import load_checkpoint

    hard = str(tmp_path / "hard")
    assert main(["train", "--out", hard, "--distill", "hard", "--teacher", teacher_run] + TINY) == 0
    soft = str(tmp_path / "soft")
    assert main(["train", "--out", soft, "--distill", "soft", "--distill-tau", "2", "--distill-alpha", "0.7",
                 "--teacher", os.path.join(teacher_run, "checkpoints", "last.pt")] + DEIT + TINY) == 0
    cfg = load_checkpoint(os.path.join(soft, "checkpoints", "last.pt"))["config"]
    assert (cfg["distill"], cfg["distill_tau"], cfg["distill_alpha"]) == ("soft", 2.0, 0.7)
    for run in (hard, soft):
        s = json.loads(open(os.path.join(run, "summary.json")).read())
        assert s["steps"] == 2 and np.isfinite(s["nll"])
    # the distilled DeiT's two heads both trained (the distillation head from the teacher)
    first = load_checkpoint(os.path.join(soft, "checkpoints", "last.pt"))["model"]
    model = vitlab.create_model("deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                img_size=28, in_chans=1, num_classes=10)
    torch.manual_seed(0)
    init = vitlab.create_model("deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=32, depth=1, num_heads=2,
                               img_size=28, in_chans=1, num_classes=10).state_dict()
    model.load_state_dict(first)
    assert not torch.equal(first["head_dist.weight"], init["head_dist.weight"])


def test_distill_bad_input_is_one_line(teacher_run, tmp_path, capsys):
    with pytest.raises(UserError, match="teacher has 10 classes, the student 5"):
        load_teacher(teacher_run, None, 5, 28, 1, torch.device("cpu"))
    with pytest.raises(UserError, match="--teacher-model vit_small"):
        load_teacher(teacher_run, "vit_small_patch16_224", 10, 28, 1, torch.device("cpu"))
    for args, text in ((["--distill", "hard"], "needs --teacher"),
                       (["--distill", "soft", "--teacher", teacher_run, "--distill-tau", "0"], "--distill-tau 0"),
                       (["--distill", "hard", "--teacher", str(tmp_path / "nope")], "nope")):
        assert main(["train", "--out", str(tmp_path / "x")] + args + TINY) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], err
