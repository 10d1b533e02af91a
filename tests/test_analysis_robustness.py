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


# -- noise by frequency ------------------------------------------------------------------------
def test_band_mask_matches_the_frequencies_counted_by_hand():
    from vitlab.analysis.robustness import band_mask

    for h, w, f, width in ((28, 28, 0.3, 0.1), (32, 24, 0.9, 0.1), (16, 16, 1.0, 0.2)):
        mask = band_mask((h, w), f, width)
        for ky in range(h):
            for kx in range(w):
                wy, wx = 2 * min(ky, h - ky) / h, 2 * min(kx, w - kx) / w  # angular frequency / pi
                inside = f - width / 2 - 1e-9 <= max(wy, wx) <= f + width / 2 + 1e-9
                assert bool(mask[ky, kx]) == inside, (h, w, f, ky, kx)
    with pytest.raises(ValueError, match="no frequency of a 8x8 image"):
        band_mask(8, 0.1, 0.1)  # grid step 0.25 pi
    assert not band_mask(8, 0.1, 0.1, allow_empty=True).any()
    with pytest.raises(ValueError, match="centre must be in"):
        band_mask(8, 1.5, 0.1, allow_empty=True)  # bad arguments still fail


def test_band_noise_has_its_energy_in_the_band_and_the_requested_rms():
    from vitlab.analysis.robustness import band_mask, band_noise

    g = torch.Generator().manual_seed(0)
    spectra = {}
    for f in (0.2, 0.5, 0.9):
        n = band_noise((4, 3, 32, 32), f, 0.1, rms=0.07, generator=g).double()
        assert torch.allclose(n.pow(2).mean((-2, -1)).sqrt(), torch.full((4, 3), 0.07, dtype=torch.float64), atol=1e-6)
        power = torch.fft.fft2(n).abs().pow(2)
        mask = band_mask(32, f, 0.1)
        assert float(power[..., ~mask].sum() / power.sum()) < 1e-10
        assert float(n.mean((-2, -1)).abs().max()) < 1e-7  # no DC component
        assert not torch.equal(n[0], n[1])  # independent draws per image
        spectra[f] = mask
    assert not (spectra[0.2] & spectra[0.5]).any() and not (spectra[0.5] & spectra[0.9]).any()


class _GlobalMean(nn.Module):
    """Logits from the per-channel image means: blind to any zero-mean perturbation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean((-2, -1)))


class _Roughness(nn.Module):
    """Class 1 ("smooth") while the mean squared Laplacian response is below 0.01: a high-pass detector."""

    def forward(self, x):
        lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
        e = torch.nn.functional.conv2d(x, lap, groups=x.shape[1]).pow(2).mean((1, 2, 3))
        return torch.stack([e - 0.01, 0.01 - e], -1)


def test_noise_frequency_accuracy_low_vs_high_pass_models():
    from vitlab.analysis.robustness import noise_frequency_accuracy

    torch.manual_seed(0)
    x = 0.5 + 0.01 * torch.rand(12, 3, 28, 28)
    blind = _GlobalMean()
    with torch.no_grad():
        y = blind(x).argmax(-1)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    res = noise_frequency_accuracy(blind, batches, (0.1, 0.5, 0.9), clip=False, mean=(0,) * 3, std=(1,) * 3)
    assert res["clean"]["acc"] == 1.0
    for f in ("0.1", "0.5", "0.9"):
        assert res["table"][f]["delta_acc"] == 0.0
        assert res["table"][f]["nll"] == pytest.approx(res["clean"]["nll"], abs=1e-5)

    ones = torch.ones(12, dtype=torch.long)  # every image is smooth: class 1
    rough = noise_frequency_accuracy(_Roughness(), [(x, ones)], (0.1, 0.5, 0.9), rms=0.1, clip=False)
    assert rough["clean"]["acc"] == 1.0
    # Laplacian gain 4 sin^2(w/2) per axis: ~0.1 at 0.1 pi, 2 at 0.5 pi, ~3.9 at 0.9 pi
    assert rough["table"]["0.1"]["delta_acc"] == 0.0
    assert rough["table"]["0.5"]["delta_acc"] == rough["table"]["0.9"]["delta_acc"] == -1.0
