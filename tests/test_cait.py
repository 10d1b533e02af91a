"""CaiT: sizes vs timm and the anti-oversmoothing table, timm parity, parts, intermediates."""
import pytest
import torch

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.layers import record_attention
from vitlab.models.cli import count_macs, count_params

timm = pytest.importorskip("timm")


def test_cait_s24_sizes_match_timm_and_spec():
    m = vitlab.create_model("cait_s24_224")
    n = count_params(m)
    assert n == count_params(timm.create_model("cait_s24_224", pretrained=False)) == 46_916_200
    # anti_oversmoothing.md: +AttnScale = +192 (8 heads x 24 SA blocks), +FeatScale = +18,432
    heads_blocks = sum(b.attn.num_heads for b in m.blocks)
    assert heads_blocks == 192
    fs_extra = 2 * 384 * 24
    assert n + fs_extra == 46_934_632
    macs = count_macs(m) / 1e9
    assert abs(macs - 9.35) / 9.35 < 0.01


@pytest.mark.parametrize("name,expected", [("attnscale_cait_s24_224", 46_916_392),
                                           ("featscale_cait_s24_224", 46_934_632)])
def test_anti_oversmoothing_cait_params(name, expected):
    # same architecture at a small input: parameter counts differ only in the position table
    small = vitlab.create_model(name, img_size=32)
    pos_delta = (14 * 14 - 2 * 2) * 384
    assert count_params(small) + pos_delta == expected


def test_cait_timm_parity_both_directions():
    from parity import check_parity

    # every parameter randomised, LayerScale gammas (per channel) and talking-heads projections too
    check_parity("cait_s24_224", img_size=32, depth=4)


def test_cait_parts_and_errors():
    with pytest.raises(ValueError, match="talking"):
        vitlab.create_model("cait_s24_224", img_size=32, depth=2, mixer="focused_linear")
    m = vitlab.create_model("cait_s24_224", img_size=32, depth=2, mixer="focused_linear", talking_heads=False,
                            norm="center")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_cait_intermediates_and_recording():
    m = vitlab.create_model("cait_s24_224", img_size=32, depth=2, num_classes=5, shortcut_init=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    inter = m.forward_halves(x)
    assert [i.kind for i in inter] == ["embed"] + ["attn", "mlp"] * 4
    assert inter[1].feature.shape == (2, 384, 2, 2) and inter[1].prefix is None
    last = inter[-1]
    assert last.stage == 1 and last.prefix.shape == (2, 1, 384)
    torch.testing.assert_close(m.head(m.norm(torch.cat([last.prefix, last.tokens], 1))[:, 0]), m(x),
                               atol=1e-5, rtol=1e-5)
    with record_attention(m) as rec:
        y = m(x)
    torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
    maps = rec.last()
    assert maps["blocks.0.attn"].shape == (2, 8, 4, 4)
    assert maps["blocks_token_only.0.attn"].shape == (2, 8, 1, 5)
    # talking heads mix probabilities after the softmax: rows need not sum to 1, but the
    # class attention rows do
    torch.testing.assert_close(maps["blocks_token_only.1.attn"].sum(-1), torch.ones(2, 8, 1))
