"""Loss landscape: the centre is the model's own loss, every grid point equals the loss of an
independently perturbed copy, directions are filter-normalised, the l2 terms follow their formulas."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.analysis.landscape import filter_normalized_direction, loss_landscape, soft_cross_entropy


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_centre_equals_model_loss_and_weights_restored():
    model = vitlab.create_model("vit_tiny_patch4_32", num_classes=5, depth=1, embed_dim=16, num_heads=2, img_size=8)
    model.train()  # the landscape must switch to eval mode and back
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = loss_landscape(model, [(x[:3], y[:3]), (x[3:], y[3:])], steps=3, weight_decay=0.1, l2="squared")
    assert model.training  # train mode restored
    model.eval()
    with torch.no_grad():
        ref = (F.cross_entropy(model(x[:3]), y[:3]) + F.cross_entropy(model(x[3:]), y[3:])) / 2
        acc = float((model(x).argmax(-1) == y).double().mean())
    sq = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
    assert res["nll"][1][1] == pytest.approx(float(ref), rel=1e-5)
    assert res["loss"][1][1] == pytest.approx(float(ref) + 0.05 * sq, rel=1e-5)
    assert res["acc"][1][1] == pytest.approx(acc)
    assert res["center"]["nll"] == pytest.approx(res["nll"][1][1], rel=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a different point differs (the directions are not zero)
    assert res["nll"][0][0] != pytest.approx(res["nll"][1][1], rel=1e-6)


def test_grid_point_equals_independently_perturbed_copy():
    torch.manual_seed(1)
    model = _mlp()
    model(torch.randn(8, 1, 6, 6))  # BN statistics move away from the init
    model.eval()
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    d1 = filter_normalized_direction(model, seed=1)
    d2 = filter_normalized_direction(model, seed=2)
    res = loss_landscape(model, [(x, y)], steps=5, span=0.5, directions=[d1, d2], weight_decay=0.01, l2="norm")
    ix, iy = 0, 3  # x = -0.5, y = 0.25
    assert res["xs"][ix] == pytest.approx(-0.5) and res["ys"][iy] == pytest.approx(0.25)
    other = copy.deepcopy(model)
    sd = other.state_dict()
    for k in d1:
        sd[k] = sd[k] - 0.5 * d1[k] + 0.25 * d2[k]
    other.load_state_dict(sd)
    with torch.no_grad():
        ref = float(F.cross_entropy(other(x), y))
    l2 = sum(float(p.detach().double().norm()) for p in other.parameters())
    assert res["nll"][iy][ix] == pytest.approx(ref, rel=1e-5)
    assert res["loss"][iy][ix] == pytest.approx(ref + 0.01 * l2, rel=1e-5)


def test_directions_are_filter_normalised():
    model = vitlab.create_model("vit_tiny_patch4_32", num_classes=5, depth=1, embed_dim=16, num_heads=2, img_size=8)
    sd = model.state_dict()
    d = filter_normalized_direction(model, norm="filter", seed=0)
    w = sd["blocks.0.attn.qkv.weight"]
    assert torch.allclose(d["blocks.0.attn.qkv.weight"].norm(dim=1), w.norm(dim=1), rtol=1e-4)
    conv = sd["patch_embed.proj.weight"]
    assert torch.allclose(d["patch_embed.proj.weight"].flatten(1).norm(dim=1), conv.flatten(1).norm(dim=1), rtol=1e-4)
    assert not d["blocks.0.attn.qkv.weight"].equal(w)
    for k, v in d.items():
        if sd[k].dim() < 2 or "pos_embed" in k:
            assert not v.any(), k  # biases, norms, position table: zero direction
    d0 = filter_normalized_direction(model, norm="dim0", seed=0)
    assert torch.allclose(d0["blocks.0.attn.qkv.weight"].norm(dim=0), w.norm(dim=0), rtol=1e-4)
    dl = filter_normalized_direction(model, norm="layer", seed=0)
    assert dl["head.weight"].norm().item() == pytest.approx(sd["head.weight"].norm().item(), rel=1e-4)
    with pytest.raises(ValueError, match="norm must be one of"):
        filter_normalized_direction(model, norm="channel")


def test_soft_cross_entropy_matches_timm_and_torch():
    from timm.loss import SoftTargetCrossEntropy
    logits = torch.randn(7, 4)
    y = torch.randint(0, 4, (7,))
    soft = F.one_hot(y, 4).float() * 0.9 + 0.1 / 4
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(SoftTargetCrossEntropy()(logits, soft).item(), rel=1e-6)
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)
    assert soft_cross_entropy(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())
    with pytest.raises(ValueError, match="steps"):
        loss_landscape(_mlp(), [(torch.randn(2, 1, 6, 6), torch.zeros(2, dtype=torch.long))], steps=0)


def test_plotted_surface_is_shifted_to_zero_and_masked_above_the_clip():
    from vitlab.analysis.landscape import landscape_surface

    loss = [[50.0, 10.0, 100.0], [9.0, 8.5, 60.0], [12.0, float("nan"), 95.0]]
    z = landscape_surface({"loss": loss}, clip=42.0)
    assert z.min() == 0.0 and z[1, 1] == 0.0 and z[0, 1] == 1.5  # minus the minimum 8.5
    assert z[0, 0] == 41.5 and not np.ma.is_masked(z[0, 0])
    assert z.mask[0, 2] and z.mask[1, 2] and z.mask[2, 2]  # 91.5, 51.5, 86.5 > 42
    assert z.mask[2, 1] and z.count() == 5  # the diverged (NaN) point is left out too
