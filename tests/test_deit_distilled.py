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
    from parity import check_parity

    # every parameter randomised (both tokens, both heads); eval logits are the heads' mean
    check_parity(name, img_size=32, depth=3)


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
    inter = m.eval().forward_halves(x)
    assert inter[-1].prefix.shape == (2, 2, 192) and inter[-1].feature.shape == (2, 192, 2, 2)
    with pytest.raises(ValueError, match="global_pool"):
        vitlab.create_model("deit_tiny_distilled_patch16_224", global_pool="avg")
