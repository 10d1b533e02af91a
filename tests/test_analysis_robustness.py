"""Robustness tables: every entry equals the accuracy recomputed by hand on corrupted copies."""
import pytest
import torch
from torch import nn

from vitlab.analysis.corruptions import corrupt
from vitlab.analysis.robustness import corrupt_any_channels, corruption_accuracy


class Tiny(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        self.default_cfg = {"mean": (0.5,) * c, "std": (0.25,) * c}

    def forward(self, x):
        return self.net(x)


def test_table_matches_manual_recomputation():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.rand(10, 3, 12, 12)
    with torch.no_grad():
        model(x)
        y = model((x - 0.5) / 0.25).argmax(-1)  # clean accuracy is 100 % by construction
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    names, sev = ["gaussian_noise", "brightness", "contrast"], [1, 5]
    res = corruption_accuracy(model, batches, names, sev, seed=3)
    assert res["clean"]["acc"] == 1.0
    for c in names:
        for s in sev:
            correct = 0
            for i, (xb, yb) in enumerate(batches):
                xc = corrupt(xb, c, s, seed=3 * 100003 + i)
                with torch.no_grad():
                    correct += int((model((xc - 0.5) / 0.25).argmax(-1) == yb).sum())
            assert res["table"][c][str(s)]["acc"] == pytest.approx(correct / 10), (c, s)
    accs = [res["table"][c][str(s)]["acc"] for c in names for s in sev]
    assert res["mean_accuracy"] == pytest.approx(sum(accs) / len(accs))
    assert res["per_corruption"]["contrast"] == pytest.approx(
        (res["table"]["contrast"]["1"]["acc"] + res["table"]["contrast"]["5"]["acc"]) / 2)
    with pytest.raises(ValueError, match="unknown corruption"):
        corruption_accuracy(model, batches, ["gausian_noise"], [1])
    with pytest.raises(ValueError, match="severities"):
        corruption_accuracy(model, batches, ["contrast"], [6])


def test_grayscale_images_are_corrupted_as_replicated_rgb():
    x = torch.rand(2, 1, 10, 10)
    got = corrupt_any_channels(x, "contrast", 3)
    ref = corrupt(x.repeat(1, 3, 1, 1), "contrast", 3).mean(1, keepdim=True)
    assert got.shape == x.shape and torch.allclose(got, ref)
    # contrast is (x - mean) * c + mean per image (Hendrycks & Dietterich): check the formula
    c = 0.4  # CIFAR table, severity 3
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(got, ((x - m) * c + m).clamp(0, 1), atol=1e-6)
