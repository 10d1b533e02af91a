"""Distilled DeiT: size and logits vs timm, the two heads, intermediates."""
import pytest
import torch

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.models.cli import count_params

timm = pytest.importorskip("timm")


def test_params_equal_timm():
    name = "deit_small_distilled_patch16_224"
    assert count_params(vitlab.create_model(name)) == count_params(timm.create_model(name)) == 22_436_432


def test_timm_parity_both_directions():
    name = "deit_small_distilled_patch16_224"
    x = torch.randn(1, 3, 32, 32)
    t = timm.create_model(name, pretrained=False, img_size=32, depth=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    v = vitlab.create_model(name, img_size=32, depth=3).eval()
    load_timm_weights(v, t.state_dict())
    with torch.no_grad():
        ref = t(x)
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(v(x), ref, atol=1e-4, rtol=0)
        t2 = timm.create_model(name, pretrained=False, img_size=32, depth=3).eval()
        t2.load_state_dict(to_timm_state_dict(v), strict=True)
        torch.testing.assert_close(t2(x), ref, atol=1e-4, rtol=0)


def test_two_heads_and_intermediates():
    m = vitlab.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    cls, dist = m.head(feats[:, 0]), m.head_dist(feats[:, 1])
    torch.testing.assert_close(m(x), (cls + dist) / 2)
    m.train()
    m.set_distilled_training(True)
    out = m(x)
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 7)
    inter = m.eval().forward_intermediates(x)
    assert inter[-1].prefix.shape == (2, 2, 192) and inter[-1].feature.shape == (2, 192, 2, 2)
    with pytest.raises(ValueError, match="global_pool"):
        vitlab.create_model("deit_tiny_distilled_patch16_224", global_pool="avg")
