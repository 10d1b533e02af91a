"""AlterNet (Alter-ResNet-50, Park & Kim 2022): sizes vs the spec, layout, window MSA vs a
brute-force reference, parts, recording."""
import pytest
import torch

import vitlab
from vitlab.layers import record_attention
from vitlab.models.cli import count_macs, count_params


@pytest.mark.parametrize("name,params_m", [("alternet50", 35.92), ("alternet50_cifar", 33.01),
                                           ("alternet50_code_cifar", 34.06)])
def test_params_match_spec(name, params_m):
    assert abs(count_params(vitlab.create_model(name)) / 1e6 - params_m) / params_m < 0.01


def test_macs_match_spec_cifar():
    macs = count_macs(vitlab.create_model("alternet50_cifar")) / 1e9
    assert abs(macs - 1.516) / 1.516 < 0.01


def test_layout_and_intermediates():
    from vitlab.models.alternet import msa_layout

    assert msa_layout(6, 3) == ("conv", "attn") * 3
    assert msa_layout(4, 1) == ("conv", "conv", "conv", "attn")
    m = vitlab.create_model("alternet50_cifar", num_classes=10).eval()
    kinds = [i.kind for i in m.forward_halves(torch.randn(1, 3, 32, 32))]
    # paper layout c1..c4: CCC | CCCM | CCCCCM | CMCM, then the classifier input
    expected = ["conv"] * 3 + ["conv"] * 3 + ["attn"] + ["conv"] * 5 + ["attn"] + ["conv", "attn"] * 2
    assert kinds == ["embed"] + expected + ["norm"]


def test_window_attention_matches_brute_force():
    from vitlab.layers import MixerSpec, TokenLayout
    from vitlab.models.alternet import alternet_attention

    a = alternet_attention(MixerSpec(), 8, 12, heads=2, size=4, head_dim=4, window_size=2).eval()
    with torch.no_grad():
        a.relative_position_bias_table.normal_()
    x = torch.randn(1, 8, 4, 4)
    out = a(x.flatten(2).transpose(1, 2), TokenLayout((4, 4))).transpose(1, 2).reshape(1, 12, 4, 4)
    w = lambda lin: lin.weight[:, :, None, None]  # noqa: E731  (a token Linear as a 1x1 conv)
    q, kv = torch.nn.functional.conv2d(x, w(a.q)), torch.nn.functional.conv2d(x, w(a.kv))
    k, v = kv[:, :8], kv[:, 8:]
    ref = torch.zeros(1, 8, 4, 4)
    table = a.relative_position_bias_table.view(3, 3)  # one (2p-1) x (2p-1) table shared by the heads
    for wy in range(2):
        for wx in range(2):
            ys = [(wy * 2 + i, wx * 2 + j) for i in range(2) for j in range(2)]
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                Q = torch.stack([q[0, sl, y, xx] for y, xx in ys])
                K = torch.stack([k[0, sl, y, xx] for y, xx in ys])
                V = torch.stack([v[0, sl, y, xx] for y, xx in ys])
                bias = torch.stack([torch.stack([table[yi - yj + 1, xi - xj + 1] for (yj, xj) in
                                                 [(p // 2, p % 2) for p in range(4)]])
                                    for (yi, xi) in [(p // 2, p % 2) for p in range(4)]])
                att = torch.softmax(Q @ K.T / 2.0 + bias, -1)
                o = att @ V
                for t, (y, xx) in enumerate(ys):
                    ref[0, sl, y, xx] = o[t]
    ref = torch.nn.functional.conv2d(ref, w(a.proj), a.proj.bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_parts_recording_and_errors():
    m = vitlab.create_model("alternet50_cifar", mixer="attnscale", shortcut="layerscale", featscale=True).eval()
    x = torch.randn(1, 3, 32, 32)
    y = m(x)
    with record_attention(m) as rec:
        y2 = m(x)
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    maps = rec.last()
    assert maps["layer2.3.attn"].shape == (16, 6, 16, 16)  # 16x16 map -> 16 windows of 4x4, 6 heads
    assert maps["layer4.3.attn"].shape == (1, 24, 16, 16)
    torch.testing.assert_close(maps["layer3.5.attn"].sum(-1), torch.ones(4, 12, 16))
    assert m.layer4[3].featscale is not None and torch.all(m.layer1[0].scale.gamma == 1e-5)
    lin = vitlab.create_model("alternet50_cifar", mixer="focused_linear")  # global linear attention, no table
    assert lin.layer4[3].attn.grouping.name == "global" and not hasattr(lin.layer4[3].attn, "relative_position_index")
    with pytest.raises(ValueError, match="BatchNorm"):
        vitlab.create_model("alternet50_cifar", norm="center")
    with pytest.raises(ValueError, match="window_size=7"):
        vitlab.create_model("alternet50_cifar", window_size=7)
