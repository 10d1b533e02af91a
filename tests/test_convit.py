"""ConViT (d'Ascoli et al., ICML 2021): timm parity, parameter counts, init, and the ``gpsa`` part checked against a
hand-written formula and in other backbones."""
import itertools

import pytest
import torch

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=32, patch_size=8, depth=3, local_up_to_layer=2, embed_dim=48, num_heads=3)


def test_timm_parity_both_ways_with_every_parameter_randomised():
    """Gating parameters, pos_proj, qk / v and the late class token all random; logits and every block's output
    (class token stripped after it joins) as timm's, and vitlab's weights give timm the same logits."""
    from parity import check_parity

    rep = check_parity("convit_tiny", **SMALL)
    assert rep.logits < 1e-4 and len(rep.intermediates) == 1 + SMALL["depth"] and not rep.notes
    # a second geometry: 4x4 px patches (8x8 grid), 4 heads, qkv bias, average pooling
    rep = check_parity("convit_tiny", img_size=32, patch_size=4, depth=3, local_up_to_layer=1, embed_dim=16,
                       num_heads=4, qkv_bias=True, global_pool="avg")
    assert rep.logits < 1e-4


def test_forward_intermediates_equal_timms():
    from parity import timm_pair

    ref, ours = timm_pair("convit_tiny", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kw in (dict(), dict(norm=True), dict(output_fmt="NLC", indices=[0, 2])):
            want_final, want = ref.forward_intermediates(x, **kw)
            got_final, got = ours.forward_intermediates(x, **kw)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_final, want_final, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["convit_tiny", "convit_small", "convit_base"])
def test_parameter_counts_equal_timms(name):
    from parity import meta_count

    assert meta_count(vitlab.create_model, name) == meta_count(timm.create_model, name)


def test_default_cfg_and_width_per_head():
    m = vitlab.create_model("convit_small", img_size=32, depth=2, local_up_to_layer=1)
    assert m.embed_dim == 48 * 9 and m.blocks[0].attn.num_heads == 9
    cfg, want = m.default_cfg, timm.create_model("convit_small", img_size=32, depth=2).pretrained_cfg
    assert cfg["fixed_input_size"] and cfg["input_size"] == (3, 32, 32)
    for key in ("mean", "std", "interpolation", "crop_pct", "num_classes"):
        assert tuple(cfg[key]) == tuple(want[key]) if key in ("mean", "std") else cfg[key] == want[key], key


def test_init_is_timms_local_init():
    """v = identity, gate = 1, pos_proj's local rows equal timm's (9 heads: all 3x3 kernel offsets), the class
    token N(0, 0.02); and each head's positional attention, sharpened, peaks at its kernel offset (sec. 3.1)."""
    kw = dict(img_size=48, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=8, num_heads=9)
    ours, ref = vitlab.create_model("convit_small", **kw), timm.create_model("convit_small", **kw)
    a, b = ours.blocks[0].attn, ref.blocks[0].attn
    torch.testing.assert_close(a.pos_proj.weight, b.pos_proj.weight, rtol=0, atol=0)
    assert torch.equal(a.v.weight, torch.eye(72)) and torch.equal(a.gating_param, torch.ones(9))
    assert a.pos_proj.bias.abs().max() == 0 and a.qk.bias is None
    assert 0.005 < ours.cls_token.std() < 0.05
    sharp = vitlab.create_model("convit_small", **kw, locality_strength=10.0).blocks[0].attn
    torch.testing.assert_close(sharp.pos_proj.weight, 10 * a.pos_proj.weight)
    pos = sharp.modifiers[0].positional(sharp, slice(None))  # (9, 36, 36) on the 6x6 grid
    q = 2 * 6 + 3  # an interior query (row 2, col 3)
    for a_, b_ in itertools.product(range(3), range(3)):
        peak = int(pos[a_ + 3 * b_, q].argmax())
        assert divmod(peak, 6) == (2 + a_ - 1, 3 + b_ - 1) and pos[a_ + 3 * b_, q, peak] > 0.99


def _by_hand(attn: MultiHeadAttention, x: torch.Tensor, grid, prefix: int) -> torch.Tensor:
    """GPSA's map written out from the paper (eq. 5-6) with explicit loops for the offsets; prefix queries keep their
    content row, prefix keys get no positional weight."""
    h, d, (gh, gw) = attn.num_heads, attn.head_dim, grid
    if hasattr(attn, "qk"):
        q, k = attn.qk(x).unflatten(-1, (2, h, d)).unbind(2)
    else:
        q, k, _ = attn.qkv(x).unflatten(-1, (3, h, d)).unbind(2)
    content = torch.einsum("bihd,bjhd->bhij", q, k).mul(d ** -0.5).softmax(-1)
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    r = torch.tensor([[[cj - ci, rj - ri, (cj - ci) ** 2 + (rj - ri) ** 2] for (rj, cj) in cells]
                      for (ri, ci) in cells], dtype=torch.float32)  # key minus query: (dx, dy, dx^2 + dy^2)
    pos = (r @ attn.pos_proj.weight.T + attn.pos_proj.bias).permute(2, 0, 1).softmax(-1)
    full = torch.zeros(h, prefix + gh * gw, prefix + gh * gw)
    full[:, prefix:, prefix:] = pos
    g = torch.sigmoid(attn.gating_param).view(1, h, 1, 1)
    mixed = (1 - g) * content + g * full
    mixed[:, :, :prefix] = content[:, :, :prefix]
    return mixed / mixed.sum(-1, keepdim=True)


def test_recorded_gpsa_map_equals_the_formula_and_the_class_token_joins_late():
    from parity import randomize_

    m = randomize_(vitlab.create_model("convit_tiny", **SMALL)).eval()
    img = torch.randn(2, 3, 32, 32)
    with record_attention(m) as rec, torch.no_grad():
        m(img)
        x = m.blocks[0].norm1(m.patch_embed(img) + m.pos_embed)
        want = _by_hand(m.blocks[0].attn, x, (4, 4), 0)
    maps, layouts = rec.last(), rec.last_layouts()
    torch.testing.assert_close(maps["blocks.0.attn"], want, atol=1e-5, rtol=1e-4)
    assert [(lay.grid, lay.num_prefix) for lay in layouts.values()] == [((4, 4), 0)] * 2 + [((4, 4), 1)]
    assert maps["blocks.2.attn"].shape == (2, 3, 17, 17)


def test_gpsa_in_a_vit_with_a_class_token_trains_and_keeps_the_class_rows():
    """The part in another backbone: ViT-Ti with its class token from the stem (the prefix extension), every
    parameter reached by the gradient (average pooling: the class row alone would not reach the gate), the recorded
    map equal to the formula."""
    from parity import randomize_

    m = randomize_(vitlab.create_model("vit_tiny_patch4_32", depth=1, embed_dim=32, num_heads=2, global_pool="avg",
                                       modifiers=("gpsa",), mixer_kwargs=dict(locality_strength=2.0)))
    img = torch.randn(2, 3, 32, 32)
    m(img).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    attn = m.blocks[0].attn
    assert attn.modifiers[0].locality_strength == 2.0 and attn.gating_param.grad.abs().sum() > 0
    with record_attention(m.eval()) as rec, torch.no_grad():
        m(img)
        x = m.blocks[0].norm1(torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(img)], 1) + m.pos_embed)
        want = _by_hand(attn, x, (8, 8), 1)
    torch.testing.assert_close(rec.last()["blocks.0.attn"], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,kw,words", [
    ("vit_tiny_patch4_32", dict(core="focused_linear"), "core 'focused_linear' cannot be combined with modifier "
                                                        "'gpsa': focused_linear never forms the attention matrix"),
    ("vit_tiny_patch4_32", dict(core="differential"), "modifier 'gpsa' cannot be combined with core 'differential'"),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(2,), num_heads=(2,), embed_dim=16),
     "modifier 'gpsa' cannot be combined with grouping 'window': its shifted-window mask"),
    ("pvt_tiny", dict(img_size=32), "modifier 'gpsa' cannot be combined with grouping 'spatial_reduction'"),
])
def test_gpsa_is_refused_in_one_line_where_it_cannot_work(name, kw, words):
    with torch.device("meta"), pytest.raises(ValueError, match=words):
        vitlab.create_model(name, **kw, **({} if "convit" in name else dict(modifiers=("gpsa",))))


def test_gpsa_refuses_another_input_size_and_bad_values():
    m = vitlab.create_model("vit_tiny_patch4_32", depth=1, embed_dim=32, num_heads=2, modifiers=("gpsa",),
                            dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"gpsa' was built for attention groups of 1 prefix \+ \(8, 8\)"):
        m(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="locality_strength must be > 0"):
        MultiHeadAttention(16, 2, modifiers=(("gpsa", dict(locality_strength=0.0)),), layout=TokenLayout((2, 2)))


@pytest.mark.parametrize("kw,words", [
    (dict(depth=2, local_up_to_layer=3), "local_up_to_layer must be in 0..depth"),
    (dict(depth=2, local_up_to_layer=2), "no block after the GPSA blocks"),
    (dict(no_embed_class=False), "drop no_embed_class"),
    (dict(patch_drop_rate=0.5), "patch_drop_rate, patch_merger and ats take tokens away"),
])
def test_convit_bad_arguments_are_one_line_errors(kw, words):
    with torch.device("meta"), pytest.raises(ValueError, match=words):
        vitlab.create_model("convit_tiny", **kw)


def test_all_gpsa_or_none_and_user_parts_in_the_gpsa_blocks():
    m = vitlab.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=2, embed_dim=8,
                            class_token=False, global_pool="avg", modifiers=("talking_heads",))
    assert [p.name for p in m.blocks[1].attn.modifiers] == ["gpsa", "talking_heads"]
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    plain = vitlab.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=0, embed_dim=8)
    assert not any(hasattr(b.attn, "gating_param") for b in plain.blocks) and plain.token_stage == 0
