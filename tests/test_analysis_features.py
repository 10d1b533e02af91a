"""Fourier / variance / oversmoothing measures against the spec's reference values and
brute-force recomputation."""
import math

import numpy as np
import pytest
import torch

from vitlab.analysis import fourier, oversmoothing
from vitlab.analysis.features import feature_statistics


pytestmark = pytest.mark.usefixtures("one_thread")


def test_constant_map_has_no_high_frequency():
    d = fourier.relative_log_amplitude(torch.ones(2, 3, 14, 14))
    assert len(d) == 7
    ref = math.log(1e-6) - math.log(196 + 1e-6)
    assert d[-1].item() == pytest.approx(ref, abs=1e-6)  # spec: -19.09
    assert d[1:].max().item() == pytest.approx(ref, abs=1e-6)  # every nonzero frequency is empty
    dn = fourier.relative_log_amplitude(torch.ones(2, 3, 14, 14), include_nyquist=True)
    assert dn[-1].item() == pytest.approx(ref, abs=1e-6)


def test_checkerboard_is_all_high_frequency():
    i = torch.arange(14)
    board = ((-1.0) ** (i[:, None] + i[None, :])).expand(2, 3, 14, 14)
    d = fourier.relative_log_amplitude(board, include_nyquist=True)
    # zero mean: A(0) = log(1e-6); all energy at (π, π): A(π) = log(196)
    assert d[-1].item() == pytest.approx(math.log(196 + 1e-6) - math.log(1e-6), abs=1e-4)
    assert d[1:-1].abs().max().item() < 1e-3  # nothing at intermediate frequencies
    # a grating at the highest diagonal frequency of the reference convention (6/7 π)
    w = 2 * math.pi * 6 / 14
    g = torch.cos(w * i[:, None].double()) * torch.cos(w * i[None, :].double())
    d2 = fourier.relative_log_amplitude(g.expand(1, 1, 14, 14))
    assert d2[-1].item() == pytest.approx(math.log(196 / 4) - math.log(1e-6), abs=1e-3)


def test_white_noise_and_blurred_noise_reference_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 192, 14, 14, generator=g)
    d = fourier.relative_log_amplitude(x)
    assert d[-1].item() == pytest.approx(0.355, abs=0.02)  # spec reference +0.355
    assert fourier.feature_map_variance(x) == pytest.approx(1.0, abs=0.01)
    # 3x3 box filter averaging the pixels inside the image (spec reference ≈ −2.10)
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, padding=1, count_include_pad=False)
    assert fourier.relative_log_amplitude(blurred)[-1].item() == pytest.approx(-2.10, abs=0.05)


def test_matches_numpy_fftshift_definition():
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    a = np.log(np.abs(np.fft.fft2(x.numpy())) + 1e-6)
    a = np.roll(a, (4, 4), axis=(2, 3)).mean(axis=(0, 1))
    diag = np.array([a[4 + i, 4 + i] for i in range(4)])
    np.testing.assert_allclose(fourier.relative_log_amplitude(x).numpy(), diag - diag[0], atol=1e-10)
    v = x.flatten(2).numpy().var(axis=-1, ddof=1).mean()
    assert fourier.feature_map_variance(x) == pytest.approx(v, rel=1e-12)


def test_oversmoothing_measures():
    g = torch.Generator().manual_seed(1)
    same = torch.randn(2, 1, 16, generator=g).expand(2, 10, 16)
    assert oversmoothing.hc_dc_ratio(same) == pytest.approx(0.0, abs=1e-12)
    assert oversmoothing.dc_energy_share(same) == pytest.approx(1.0)
    assert oversmoothing.patch_uniformity(same) == pytest.approx(1.0)
    x = torch.randn(8, 196, 384, generator=g)
    assert oversmoothing.hc_dc_ratio(x) == pytest.approx(math.sqrt(195), rel=0.05)  # spec: √(N−1)
    # patch uniformity vs brute force over pairs
    y = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    brute = np.mean([np.mean([float(torch.cosine_similarity(y[b, i], y[b, j], dim=0))
                              for i in range(6) for j in range(6) if i != j]) for b in range(2)])
    assert oversmoothing.patch_uniformity(y) == pytest.approx(brute, abs=1e-10)
    hf = float(((y - y.mean(1, keepdim=True)) ** 2).sum((1, 2)).div((y ** 2).sum((1, 2))).mean())
    assert oversmoothing.high_frequency_fraction(y) == pytest.approx(hf, abs=1e-10)


def test_uniform_softmax_attention_makes_tokens_equal():
    from vitlab.layers.attention import Attention
    attn = Attention(16, num_heads=2)
    with torch.no_grad():
        attn.qkv.weight[:32].zero_()  # q = k = 0 -> uniform weights 1/N
        attn.qkv.bias[:32].zero_()
    x = torch.randn(3, 9, 16)
    from vitlab.layers.recording import record_attention
    with record_attention(attn) as rec:
        y = attn(x)
    probs = next(iter(rec.last().values()))
    assert torch.allclose(probs, torch.full_like(probs, 1 / 9))
    assert oversmoothing.low_pass_distance(probs).max().item() == pytest.approx(0.0, abs=1e-6)
    assert oversmoothing.hc_dc_ratio(y) < 1e-6
    assert oversmoothing.patch_uniformity(y) == pytest.approx(1.0, abs=1e-6)
    assert oversmoothing.attention_collapse([probs, probs]) == [pytest.approx(1.0)]


def test_feature_statistics_on_vit_matches_direct_computation():
    from vitlab import create_model
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", depth=2, embed_dim=32, num_heads=2, num_classes=10).eval()
    x = torch.rand(7, 3, 32, 32)
    stats = feature_statistics(model, x, batch_size=3)  # 3 batches: accumulation must be exact
    with torch.no_grad():
        inter = model.forward_halves(x)
    assert stats["names"] == [e.name for e in inter]
    assert stats["kinds"] == ["embed", "attn", "mlp", "attn", "mlp"]
    assert stats["depth"] == [0, 0.25, 0.5, 0.75, 1.0]
    for i, e in enumerate(inter):
        assert stats["high_freq"][i] == pytest.approx(fourier.high_frequency_amplitude(e.feature), abs=1e-9)
        assert stats["variance"][i] == pytest.approx(fourier.feature_map_variance(e.feature), rel=1e-6)
        assert stats["hc_dc"][i] == pytest.approx(oversmoothing.hc_dc_ratio(e.tokens), rel=1e-6)
        assert stats["cos_sim"][i] == pytest.approx(oversmoothing.patch_uniformity(e.tokens), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="B, C, H, W"):
        fourier.relative_log_amplitude(torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="2x2"):
        fourier.relative_log_amplitude(torch.ones(1, 1, 1, 1))
    with pytest.raises(ValueError, match="B, N, D"):
        oversmoothing.hc_dc_ratio(torch.ones(4))
