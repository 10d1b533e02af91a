"""Attention maps: probabilities against a manual softmax, the focused-linear implied matrix
against the fast path, mean attention distance and entropy against brute force / closed forms."""
import math

import pytest
import torch

import vitlab
from vitlab.analysis.attention import (attention_entropy, attention_maps, attention_rollout, attention_statistics,
                                       mean_attention_distance, plot_attention_overlay, token_layout)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw):
    return vitlab.create_model("vit_tiny_patch4_32", num_classes=10, depth=2, embed_dim=32, num_heads=2,
                               img_size=16, **kw).eval()


def test_distance_matches_brute_force_loops():
    b, h, p, gh, gw = 2, 3, 1, 3, 4
    n = p + gh * gw
    probs = torch.rand(b, h, n, n).softmax(-1)
    got = mean_attention_distance(probs, (gh, gw), num_prefix=p, scale=4.0)
    ref = torch.zeros(h, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            tot = 0.0
            for i in range(gh * gw):
                row = probs[bi, hi, p + i, p:].double()
                row = row / row.sum()
                yi, xi = divmod(i, gw)
                for j in range(gh * gw):
                    yj, xj = divmod(j, gw)
                    tot += float(row[j]) * 4.0 * math.hypot(yi - yj, xi - xj)
            ref[hi] += tot / (gh * gw) / b
    assert torch.allclose(got, ref, atol=1e-10)


def test_distance_and_entropy_closed_forms():
    gh = gw = 4
    n = gh * gw
    eye = torch.eye(n)[None, None]
    assert mean_attention_distance(eye, (gh, gw)).item() == pytest.approx(0.0)
    assert attention_entropy(eye).item() == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    assert attention_entropy(uniform).tolist() == pytest.approx([math.log(n)] * 2)
    # every query attends to its horizontal neighbour: distance exactly 1
    nb = torch.zeros(1, 1, n, n)
    for i in range(n):
        y, x = divmod(i, gw)
        nb[0, 0, i, y * gw + (x + 1 if x + 1 < gw else x - 1)] = 1
    assert mean_attention_distance(nb, (gh, gw)).item() == pytest.approx(1.0)
    # two keys at 50/50: entropy log 2
    half = 0.5 * (nb + eye)
    assert attention_entropy(half).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="does not match"):
        mean_attention_distance(eye, (3, 3))


def test_recorded_softmax_equals_manual_attention():
    model = _tiny()
    x = torch.randn(2, 3, 16, 16)
    maps = attention_maps(model, x)
    assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]
    blk = model.blocks[0]
    tokens = model.forward_halves(x)[0].all_tokens  # embedding + class token (the contract)
    q, k, _ = blk.attn.qkv(blk.norm1(tokens)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    ref = ((q @ k.transpose(-2, -1)) / math.sqrt(16)).softmax(-1)
    assert maps["blocks.0.attn"].shape == (2, 2, 17, 17)
    assert torch.allclose(maps["blocks.0.attn"], ref, atol=1e-5)


def test_focused_linear_implied_matrix_reproduces_fast_path():
    model = _tiny(mixer="focused_linear")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fast = model(x)  # never forms the N x N matrix
    maps = attention_maps(model, x)  # recomputes the output from the implied matrix
    with torch.no_grad(), vitlab.layers.record_attention(model):
        slow = model(x)
    assert torch.allclose(fast, slow, atol=1e-4)
    a = maps["blocks.1.attn"]
    assert (a >= 0).all() and torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=2e-3)  # eps in the normaliser
    assert (attention_entropy(a) <= math.log(17) + 1e-9).all()


def test_statistics_units_and_rollout(tmp_path):
    model = _tiny()
    x = torch.rand(3, 3, 16, 16)
    st = attention_statistics(model, x, batch_size=2)
    maps = attention_maps(model, x)
    assert st["names"] == list(maps) and st["num_images"] == 3
    assert st["layout"][0] == {"num_prefix": 1, "grid": [4, 4]}
    for i, name in enumerate(st["names"]):
        ref = mean_attention_distance(maps[name], (4, 4), 1)
        assert st["distance"][i] == pytest.approx(ref.tolist(), rel=1e-9)
        assert st["distance_px"][i] == pytest.approx([4 * v for v in ref.tolist()], rel=1e-9)  # patch size 4
        assert st["entropy"][i] == pytest.approx(attention_entropy(maps[name]).tolist(), rel=1e-9)
    # rollout: residual 0 -> product of head means; identity maps -> identity
    ms = list(maps.values())
    r = attention_rollout(ms, residual=0.0)
    ref = ms[1].double().mean(1) @ ms[0].double().mean(1)
    assert torch.allclose(r, ref, atol=1e-10)
    eye = torch.eye(17)[None, None].expand(1, 2, 17, 17)
    assert torch.allclose(attention_rollout([eye, eye]), torch.eye(17, dtype=torch.float64)[None])
    assert token_layout(17, [(4, 4)]) == (1, (4, 4)) and token_layout(49, []) == (0, (7, 7))
    assert token_layout(24, []) is None
    path = plot_attention_overlay(x[0], attention_maps(model, x[:1]), tmp_path / "o.png", grids=[(4, 4)])
    assert path.stat().st_size > 1000


def test_attention_statistics_use_the_recorded_layout_never_a_guess():
    """Distances are measured on the grid each attention recorded: a Swin window is its 2x2 window,
    and CSwin's stripes of two shapes in one call get no distance (a square-number guess was wrong)."""
    import vitlab
    from vitlab.analysis.attention import attention_statistics, mean_attention_distance
    from vitlab.layers import record_attention

    torch.manual_seed(0)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 2),
                               num_heads=(2, 2), window_size=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    stats = attention_statistics(swin, x)
    i = stats["names"].index("layers.0.blocks.0.attn")
    assert stats["layout"][i] == {"num_prefix": 0, "grid": [2, 2]}
    with record_attention(swin) as rec, torch.no_grad():
        swin(x)
    ref = mean_attention_distance(rec.last()["layers.0.blocks.0.attn"], (2, 2), 0)
    assert torch.allclose(torch.tensor(stats["distance"][i]), ref.double().float(), atol=1e-5)
    cswin = vitlab.create_model("cswin_tiny_224", img_size=64, embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 2),
                                split_size=(1, 2, 2), num_classes=10).eval()
    stats = attention_statistics(cswin, torch.randn(1, 3, 64, 64))
    # 16x16 map: stripes 16x1 and 1x16 (16 keys each, a square number) in one call
    i = stats["names"].index("layers.0.blocks.0.attn")
    assert stats["layout"][i] is None and stats["distance"][i] is None


def test_signed_maps_get_no_entropy_or_distance():
    """Differential attention records softmax1 - lambda softmax2, which has negative entries once the two maps
    differ: entropy and distance are refused for it, the low-pass distance is still given."""
    import math

    from vitlab.analysis.attention import attention_entropy, attention_statistics, is_signed

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    kw = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    diff = vitlab.create_model("vit_small_patch16_224", core="differential", **kw)
    plain = vitlab.create_model("vit_small_patch16_224", **kw)
    with torch.no_grad():  # sharp, different maps (at init both are near-uniform and the difference positive)
        for blk in diff.blocks:
            blk.attn.qkv.weight.mul_(8)
    maps = attention_maps(diff, x)
    assert all(is_signed(p) for p in maps.values())
    with pytest.raises(ValueError, match="attention entropy needs attention probabilities"):
        attention_entropy(next(iter(maps.values())))
    s, ref = attention_statistics(diff, x), attention_statistics(plain, x)
    assert s["signed"] == [True, True] and ref["signed"] == [False, False]
    assert s["entropy"] == [None, None] and s["distance"] == [None, None]
    assert all(v is not None and math.isfinite(v) for row in s["low_pass_distance"] for v in row)
    # probabilities: entropy never above log N
    assert all(h <= u + 1e-9 for row, u in zip(ref["entropy"], ref["entropy_uniform"]) for h in row)


def test_explicit_attention_normalises_in_float32_under_bf16_autocast():
    """Under bf16 autocast the explicit path (recording, small biased windows) adds the bias to and normalises
    float32 logits, as timm's float32 tables make it do: probability rows sum to 1 to float32 accuracy (a bf16
    softmax is off by up to ~4e-3), and the logits stay within bf16 accuracy of float32."""
    torch.manual_seed(0)
    m = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 4),
                            num_classes=10).eval()
    for p in m.parameters():  # the relative tables and biases matter
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)  # small biased windows: the explicit path, not recording
            probs = attention_maps(m, x)
    assert all(p.dtype == torch.float32 and (p.sum(-1) - 1).abs().max().item() < 1e-5 for p in probs.values())
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
