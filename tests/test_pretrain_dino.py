"""DINO (vitlab.pretrain.dino), multi-crop and k-NN evaluation against the reference's formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitlab
from vitlab.errors import UserError
from vitlab.pretrain.crops import MultiCrop
from vitlab.pretrain.dino import (DINO, DINOLoss, cancel_last_layer_gradients, clip_gradients, cosine_schedule,
                                  ema_update, teacher_temperatures)
from vitlab.pretrain.knn import knn_predict

KW = dict(img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2, num_classes=0, in_chans=1,
          dynamic_img_size=True)


def _dino(**kw):
    torch.manual_seed(0)
    student = vitlab.create_model("vit_tiny_patch16_224", **KW)
    teacher = vitlab.create_model("vit_tiny_patch16_224", **KW)
    return DINO(student, teacher, 16, ncrops=4, epochs=3, steps_per_epoch=5, out_dim=32, hidden_dim=24,
                bottleneck_dim=8, **kw)


def test_teacher_temperature_schedule_and_momentum_schedule():
    temps = teacher_temperatures(0.04, 0.07, 3, 5)
    assert np.allclose(temps, np.concatenate([np.linspace(0.04, 0.07, 3), np.full(2, 0.07)]))
    assert teacher_temperatures(0.04, 0.04, 0, 4) == [0.04] * 4
    m = cosine_schedule(0.996, 1.0, 2, 5)
    assert len(m) == 10 and m[0] == pytest.approx(0.996)
    assert m[7] == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * 7 / 10)) / 2)
    assert all(a < b for a, b in zip(m, m[1:])) and m[-1] < 1


def test_teacher_ema_update_matches_the_formula():
    dino = _dino()
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in dino.teacher.parameters()]
    dino.after_step(3)
    m = dino.momentum[3]
    for t0, ps, pt in zip(before, dino.student.parameters(), dino.teacher.parameters()):
        assert torch.allclose(pt, m * t0 + (1 - m) * ps, atol=1e-6)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * b.weight.detach() + 0.1 * a.weight.detach()
    ema_update(a, b, 0.9)
    assert torch.allclose(b.weight, expected)


def test_centering_update_and_loss_by_hand():
    torch.manual_seed(0)
    loss_fn = DINOLoss(6, ncrops=3, temperatures=[0.04, 0.05], student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 6))
    c0 = loss_fn.center.clone()
    s, t = torch.randn(3 * 4, 6), torch.randn(2 * 4, 6)
    loss = loss_fn(s, t, epoch=1)
    assert torch.allclose(loss_fn.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True))
    q = F.softmax((t - c0) / 0.05, dim=-1).chunk(2)
    logp = F.log_softmax(s / 0.1, dim=-1).chunk(3)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # every teacher global view with every other student view
    hand = sum((-q[i] * logp[v]).sum(-1).mean() for i, v in pairs) / len(pairs)
    assert torch.allclose(loss, hand)


def test_student_sees_local_crops_teacher_only_global_and_gets_no_gradient():
    dino = _dino()
    seen = {"student": [], "teacher": []}
    for role in seen:
        wrapper = getattr(dino, role)
        orig = wrapper.features
        wrapper.features = (lambda f, r: (lambda x: seen[r].append(tuple(x.shape)) or f(x)))(orig, role)
    crops = [torch.randn(2, 1, 16, 16) for _ in range(2)] + [torch.randn(2, 1, 8, 8) for _ in range(2)]
    loss = dino(crops, epoch=0)
    assert seen["teacher"] == [(4, 1, 16, 16)]
    assert seen["student"] == [(4, 1, 16, 16), (4, 1, 8, 8)]
    loss.backward()
    assert all(p.grad is None for p in dino.teacher.parameters())
    assert all(not p.requires_grad for p in dino.teacher.parameters())
    assert any(p.grad is not None for p in dino.student.backbone.parameters())


def test_head_last_layer_norm_is_fixed_and_frozen_in_the_first_epoch():
    dino = _dino(clip_grad=0.0)
    g = dino.student.head.last_layer.parametrizations.weight.original0
    assert torch.all(g == 1) and not g.requires_grad
    crops = [torch.randn(2, 1, 16, 16) for _ in range(2)] + [torch.randn(2, 1, 8, 8) for _ in range(2)]
    dino(crops, epoch=0).backward()
    cancel_last_layer_gradients(0, dino.student, 1)
    assert dino.student.head.last_layer.parametrizations.weight.original1.grad is None
    dino(crops, epoch=1).backward()
    cancel_last_layer_gradients(1, dino.student, 1)
    assert dino.student.head.last_layer.parametrizations.weight.original1.grad is not None


def test_clip_gradients_is_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    model = torch.nn.Module()
    model.a, model.b = a, b
    clip_gradients(model, 3.0)
    assert torch.allclose(a.grad, torch.tensor([30.0, 40.0, 0.0]) * 3.0 / (50.0 + 1e-6))
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))  # under the clip: unchanged (not a global norm)


def test_multicrop_sizes_and_bad_local_size():
    img = Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8))
    crops = MultiCrop(28, 1, [0.5], [0.5], local_crops=3, local_size=12)(img)
    assert [tuple(c.shape) for c in crops] == [(1, 28, 28)] * 2 + [(1, 12, 12)] * 3
    with pytest.raises(UserError, match="--local-size 32"):
        MultiCrop(28, 1, [0.5], [0.5], local_crops=2, local_size=32)
    full = MultiCrop(28, 1, [0.5], [0.5], local_crops=2, local_size=28)(img)  # vit-pytorch's full-size local crops
    assert [tuple(c.shape) for c in full] == [(1, 28, 28)] * 4


def test_knn_equals_scikit_learn_weighted_vote():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8))
    y = rng.integers(0, 4, 300)
    x = centres[y] + 1.2 * rng.normal(size=(300, 8))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    train, test = slice(0, 200), slice(200, 300)
    ours = knn_predict(torch.tensor(x[train], dtype=torch.float32), torch.tensor(y[train]),
                       torch.tensor(x[test], dtype=torch.float32), k=20, t=0.07, num_classes=4)
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine", weights=lambda d: np.exp(-d / 0.07))
    ref.fit(x[train], y[train])
    assert np.array_equal(ours.numpy(), ref.predict(x[test]))
    assert 0.3 < (ours.numpy() == y[test]).mean() < 1.0  # a non-trivial problem
