"""The timm parity helper (tests/parity.py) sees the bugs that timm's default init hides.

Each case loads randomised timm weights into vitlab, then resets one kind of tensor in the
vitlab model to the value timm's init would have given it (a zero qkv bias, unit LayerScale,
unit running variance, a zero relative-position table): a model that ignored that tensor
behaves exactly like this, and the helper must report a mismatch.
"""
import pytest
import torch
from torch import nn

import vitlab.interop
from parity import check_parity, compare, randomize_, timm_pair

pytestmark = pytest.mark.usefixtures("one_thread")

SWIN_SMALL = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=7)
CASES = [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2), "attn.qkv.bias", 0.0),
    ("cait_s24_224", dict(img_size=32, depth=2), "ls1.gamma", 1.0),
    ("resnet50", dict(), "running_var", 1.0),
    ("swin_tiny_patch4_window7_224", SWIN_SMALL, "relative_position_bias_table", 0.0),
]


def _reset(model: nn.Module, suffix: str, value: float) -> int:
    """Fill every state-dict tensor of ``model`` whose key ends in ``suffix`` (shared storage)."""
    hits = [t for k, t in model.state_dict().items() if k.endswith(suffix)]
    with torch.no_grad():
        for t in hits:
            t.fill_(value)
    return len(hits)


@pytest.mark.parametrize("name,kw,suffix,value", CASES, ids=[c[2] for c in CASES])
def test_compare_reports_a_tensor_the_model_ignores(name, kw, suffix, value):
    ref, ours = timm_pair(name, **kw)
    c, h, w = ours.default_cfg["input_size"]
    x = torch.randn(2, c, min(h, 64), min(w, 64))
    assert compare(ref, ours, x).worst() < 1e-4
    assert _reset(ours, suffix, value) > 0
    rep = compare(ref, ours, x)
    assert rep.logits > 1e-2 * rep.logits_scale, rep


def test_check_parity_fails_when_qkv_bias_is_ignored(monkeypatch):
    real = vitlab.interop.load_timm_weights

    def load_then_drop_qkv_bias(model, sd):
        real(model, sd)
        _reset(model, "attn.qkv.bias", 0.0)
        return model

    monkeypatch.setattr(vitlab.interop, "load_timm_weights", load_then_drop_qkv_bias)
    with pytest.raises(AssertionError, match="logits differ"):
        check_parity("vit_tiny_patch16_224", img_size=32, depth=2)


def test_randomize_draws_every_float_tensor():
    import timm
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomize_(model, seed=3)
    after = model.state_dict()
    for k, v in after.items():
        if not v.is_floating_point():
            assert torch.equal(v, before[k]), k  # integer buffers are structure, not weights
            continue
        assert not torch.equal(v, before[k]), f"{k} kept its init"
        if v.numel() > 1:
            assert float(v.std()) > 0, f"{k} is constant"
        if k.endswith("running_var"):
            assert bool((v > 0).all()), k
    again = randomize_(timm.create_model("resnet18", pretrained=False, num_classes=5), seed=3).state_dict()
    assert all(torch.equal(again[k], after[k]) for k in after)  # fixed seed: the same draw


def test_randomize_refuses_a_tensor_without_a_rule():
    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.tau = nn.Parameter(torch.tensor(1.0))

    with pytest.raises(AssertionError, match="no rule for tau"):
        randomize_(Temperature())
