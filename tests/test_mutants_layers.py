"""Tests for mutants that survived mutmut over ``vitlab.layers`` (issue 18, item 7): each one fails
on a deliberate bug that the rest of the suite let through (a preset dropping an argument, a
fast path taken when a hook or dropout forbids it, a prefix concatenation never run, ...)."""
import pytest
import torch
from torch import nn

from vitlab.layers import (MIXERS, Attention, CenterNorm, ConvStem, CosineAttention, FocusedLinearAttention, Mlp,
                           Pooling, TokenLayout, create_mixer, resample_pos_embed)
from vitlab.layers.layout import as_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nan_fill():
    """``torch.empty`` returns NaN-filled memory: a result that a fast path forgot to write shows."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(old)


# -- attention presets: every argument reaches the parts, defaults as documented -------------------
def test_attention_presets_defaults():
    a = Attention(16)
    assert (a.num_heads, a.core.name, a.modifiers, a.layout) == (8, "softmax", [], None)
    assert a.qkv.bias is not None and isinstance(a.q_norm, nn.Identity)
    assert a.attn_drop.p == 0.0 and a.proj_drop.p == 0.0
    c = CosineAttention(16)
    assert (c.num_heads, c.core.name, c.modifiers, c.layout) == (8, "cosine", [], None)
    assert c.qkv.bias is not None and c.attn_drop.p == 0.0 and c.proj_drop.p == 0.0
    assert (c.core.tau, c.core.learn_tau, c.core.normalize_v, c.core.eps) == (10.0, False, False, 0.0)
    f = FocusedLinearAttention(16)
    assert (f.num_heads, f.core.name, f.layout, f.pos_enc) == (8, "focused_linear", None, None)
    assert f.qkv.bias is not None and f.attn_drop.p == 0.0 and f.proj_drop.p == 0.0
    assert (f.core.focusing_factor, f.core.kernel_size, f.dwc.kernel_size) == (3.0, 5, (5, 5))


def test_attention_presets_pass_every_argument():
    lay = TokenLayout((2, 3), 1)
    a = Attention(16, 2, qkv_bias=False, qk_norm=True, attn_drop=0.1, proj_drop=0.2, attn_scale=True, layout=lay)
    assert (a.num_heads, a.layout, a.qkv.bias, a.attn_drop.p, a.proj_drop.p) == (2, lay, None, 0.1, 0.2)
    assert isinstance(a.q_norm, nn.LayerNorm) and [m.name for m in a.modifiers] == ["attnscale"]
    assert hasattr(a, "attn_scale")
    c = CosineAttention(16, 2, qkv_bias=False, attn_drop=0.1, proj_drop=0.2, attn_scale=True, tau=3.0,
                        learn_tau=True, normalize_v=True, eps=0.5, layout=lay)
    assert (c.num_heads, c.layout, c.qkv.bias, c.attn_drop.p, c.proj_drop.p) == (2, lay, None, 0.1, 0.2)
    assert [m.name for m in c.modifiers] == ["attnscale"]
    assert (c.core.tau, c.core.learn_tau, c.core.normalize_v, c.core.eps) == (3.0, True, True, 0.5)
    f = FocusedLinearAttention(16, 2, qkv_bias=False, attn_drop=0.1, proj_drop=0.2, focusing_factor=2.0,
                               kernel_size=3, layout=lay)
    assert (f.num_heads, f.layout, f.qkv.bias, f.attn_drop.p, f.proj_drop.p) == (2, lay, None, 0.1, 0.2)
    assert (f.core.focusing_factor, f.dwc.kernel_size, tuple(f.pos_enc.shape)) == (2.0, (3, 3), (1, 7, 16))
    assert tuple(FocusedLinearAttention(16, 2, num_tokens=9).pos_enc.shape) == (1, 9, 16)


def test_mixer_shorthands_build_their_core_and_modifiers():
    """The registered shorthands (built at import): core, modifiers, default heads, attention flag."""
    for name, core, mods in [("softmax", "softmax", ()), ("cosine", "cosine", ()),
                             ("focused_linear", "focused_linear", ()), ("attnscale", "softmax", ("attnscale",))]:
        fn = MIXERS.get(name)
        assert fn.attention is True and (fn.core_name, fn.modifier_names) == (core, mods)
        m = fn(16)
        assert (m.dim, m.num_heads, m.core.name, tuple(p.name for p in m.modifiers)) == (16, 8, core, mods)
        if core != "focused_linear":  # (talking heads needs the matrix)
            m = fn(16, 2, modifiers=("talking_heads",))
            assert tuple(p.name for p in m.modifiers) == ("talking_heads",) + mods
        assert fn(16, 4, core="cosine").core.name == "cosine" and fn(16, 4).num_heads == 4
    assert create_mixer("attnscale", 16, 2, qkv_bias=False).qkv.bias is None


# -- Pooling and the token layout --------------------------------------------------------------------
def test_pooling_is_avgpool_minus_identity_without_a_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6)
    fm = x.transpose(1, 2).reshape(2, 6, 4, 4)
    ref = nn.functional.avg_pool2d(fm, 3, 1, 1, count_include_pad=False) - fm
    out = Pooling(6)(x)  # no layout: the square grid of the 16 tokens
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2))
    out = Pooling(6)(torch.cat([x[:, :1], x], 1), TokenLayout((4, 4), 1))
    assert torch.equal(out[:, 0], torch.zeros(2, 6))
    torch.testing.assert_close(out[:, 1:], ref.flatten(2).transpose(1, 2))


def test_layout_from_map_puts_the_prefix_first_and_as_layout_infers_the_grid():
    lay = TokenLayout((2, 3), 1)
    fm = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 2, 3)
    prefix = torch.full((2, 1, 4), -1.0)
    out = lay.from_map(fm, prefix)
    assert out.shape == (2, 7, 4) and torch.equal(out[:, :1], prefix)
    assert torch.equal(out[:, 1:], fm.flatten(2).transpose(1, 2))
    assert torch.equal(lay.to_map(out), fm)
    assert torch.equal(lay.from_map(fm, prefix[:, :0]), fm.flatten(2).transpose(1, 2))
    assert as_layout(17, num_prefix=1) == TokenLayout((4, 4), 1)
    assert as_layout(13, num_prefix=4) == TokenLayout((3, 3), 4)
    assert as_layout(7, grid=(2, 3), num_prefix=1) == TokenLayout((2, 3), 1)
    assert as_layout(16) == TokenLayout((4, 4), 0)
    with pytest.raises(ValueError, match="square token grid from 15 tokens"):
        as_layout(16, num_prefix=1)
    with pytest.raises(ValueError, match="got 6 tokens"):
        lay.check(torch.zeros(1, 6, 4))
    lay.check(torch.zeros(1, 7, 4))


# -- norms, position tables, stems ---------------------------------------------------------------------
def test_center_norm_lipschitz_constant_without_affine():
    assert CenterNorm(5, elementwise_affine=False).lipschitz_constant() == pytest.approx(5 / 4)
    n = CenterNorm(5)
    with torch.no_grad():
        n.weight.copy_(torch.tensor([0.5, -3.0, 1.0, 2.0, 0.0]))
    assert n.lipschitz_constant() == pytest.approx(5 / 4 * 3.0)


def test_resample_pos_embed_non_square_grid_mode_and_default_prefix():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 2 * 8, 4)  # a 2 x 8 grid (not square) + one class token
    out = resample_pos_embed(pe, (4, 4), (2, 8))  # default: one prefix token, bicubic
    ref = resample_abs_pos_embed(pe, [4, 4], [2, 8], num_prefix_tokens=1, interpolation="bicubic", antialias=True)
    assert torch.equal(out, ref) and torch.equal(out[:, 0], pe[:, 0])
    bl = resample_pos_embed(pe, (4, 4), (2, 8), mode="bilinear")
    ref = resample_abs_pos_embed(pe, [4, 4], [2, 8], num_prefix_tokens=1, interpolation="bilinear", antialias=True)
    assert torch.equal(bl, ref) and not torch.allclose(bl, out)


def test_conv_stem_layers_and_tokens():
    stem = ConvStem(img_size=32, patch_size=8, in_chans=3, embed_dim=64)
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 16, (3, 3), (2, 2)), (16, 16, (3, 3), (2, 2)), (16, 32, (3, 3), (2, 2)), (32, 64, (1, 1), (1, 1))]
    assert all(c.bias is None for c in convs[:-1]) and convs[-1].bias is not None
    assert [type(m) for m in stem.proj[:3]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert all(c.padding == (1, 1) for c in convs[:-1]) and stem.grid_size == (4, 4)
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)
    assert ConvStem(img_size=16, patch_size=4, embed_dim=32, bias=False).proj[-1].bias is None
    d = ConvStem()  # defaults: 224 px, patch 16, RGB, 768 channels
    assert (d.img_size, d.patch_size, d.proj[0].in_channels, d.proj[-1].out_channels) == ((224, 224), (16, 16), 3, 768)
    norm = nn.LayerNorm(32)
    s2 = ConvStem(img_size=8, patch_size=2, embed_dim=32, norm_layer=norm, dynamic_img_size=True)
    assert s2.norm is norm and len([m for m in s2.proj if isinstance(m, nn.Conv2d)]) == 2
    tokens, hw = s2(torch.randn(1, 3, 12, 10))  # any size divisible by the patch
    assert tokens.shape == (1, 30, 32) and hw == (6, 5)
    for bad in (6, 1, (4, 8)):
        with pytest.raises(ValueError, match="power-of-two"):
            ConvStem(img_size=48, patch_size=bad, embed_dim=32)


# -- Mlp: the chunked no-autograd path (taken where the oneDNN path is off) -------------------------------
def _mlp(bias=True):
    torch.manual_seed(0)
    mlp = Mlp(24, 96, bias=bias).eval()
    mlp.chunk_bytes, mlp.chunk_target = 1000, 3000
    return mlp


def _taken(monkeypatch):
    taken, orig = [], Mlp._chunked
    monkeypatch.setattr(Mlp, "_chunked", lambda self, x: taken.append(1) or orig(self, x))
    return taken


@pytest.mark.usefixtures("plain_linear")
@pytest.mark.filterwarnings("error")  # an out= slice of the wrong size is resized with a warning
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_chunked_path_writes_every_row(bias, monkeypatch, nan_fill):
    mlp = _mlp(bias)
    x = torch.randn(3, 37, 24)
    ref = mlp.fc2(nn.functional.gelu(mlp.fc1(x))).detach()
    taken = _taken(monkeypatch)
    with torch.no_grad():
        out = mlp(x)
    assert taken and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("plain_linear")
def test_mlp_chunked_in_training_mode_only_without_dropout(monkeypatch):
    mlp = _mlp().train()
    x = torch.randn(3, 37, 24)
    taken = _taken(monkeypatch)
    with torch.no_grad():
        mlp(x)
    assert taken  # training with p = 0: the same result, so the fast path
    taken.clear()
    mlp.drop2.p = 0.5  # the second dropout alone forbids it
    with torch.no_grad():
        mlp(x)
    assert not taken


@pytest.mark.usefixtures("plain_linear")
@pytest.mark.parametrize("part", ["fc1", "act", "drop1", "drop2"])
def test_mlp_hook_on_any_part_disables_chunking(part, monkeypatch):
    mlp = _mlp()
    seen = []
    getattr(mlp, part).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    taken = _taken(monkeypatch)
    with torch.no_grad():
        mlp(torch.randn(3, 37, 24))
    assert not taken and seen == [torch.Size([3, 37, 96 if part != "drop2" else 24])]


# -- window helpers ---------------------------------------------------------------------------------
def test_resize_relative_position_table_methods_and_shapes():
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table, resize_rel_pos_bias_table_simple

    from vitlab.layers.window import resize_relative_position_table as resize

    torch.manual_seed(0)
    table = torch.randn(5 * 5, 3)  # a 3 x 3 window, 3 heads
    assert resize(table, (3, 3)) is table
    out = resize(table, (4, 4))  # default: timm's geometric resize
    assert torch.equal(out, resize_rel_pos_bias_table(table, (4, 4), (7 * 7, 3)))
    assert torch.equal(resize(table, (4, 4), "timm"), out)
    simple = resize(table, (4, 4), method="bicubic")
    assert torch.equal(simple, resize_rel_pos_bias_table_simple(table, (4, 4), (7 * 7, 3)))
    assert not torch.allclose(simple, out)
    assert resize(table, (2, 4), method="bicubic").shape == (3 * 7, 3)  # a non-square window
    assert resize(torch.randn(9, 25), (3, 3)).shape == (25, 25)  # as many heads as new positions
    with pytest.raises(ValueError, match="resize method"):
        resize(table, (4, 4), method="TIMM")
    with pytest.raises(ValueError, match=r"got shape \(25,\)"):
        resize(table[:, 0], (4, 4))
    with pytest.raises(ValueError, match=r"shape \(24, 3\) is not from a square"):
        resize(table[:24], (4, 4))


# -- focused linear attention ----------------------------------------------------------------------
def test_focusing_function_default_power_is_three():
    from vitlab.layers.linear_attention import focusing_function

    x = torch.rand(4, 6) + 0.1
    ref = x ** 3 * (x.norm(dim=-1, keepdim=True) / (x ** 3).norm(dim=-1, keepdim=True))
    torch.testing.assert_close(focusing_function(x), ref)


def test_focused_linear_normaliser_counts_the_keys():
    """Rows divided by their sum plus ``n_keys * 1e-6`` (the released code's normaliser)."""
    m = FocusedLinearAttention(8, 2)
    logits = torch.full((1, 2, 3, 50), 1e-7)  # 3 queries, 50 keys: the eps term dominates
    torch.testing.assert_close(m.core.normalize(m, logits), logits / (50 * 1e-7 + 50 * 1e-6))


def test_focused_linear_explicit_path_uses_the_focusing_factor():
    from vitlab.layers import record_attention

    torch.manual_seed(0)
    lay = TokenLayout((3, 4), 1)
    m = FocusedLinearAttention(16, 2, focusing_factor=2.0, layout=lay).eval()
    with torch.no_grad():
        m.scale_param.normal_(std=0.5)
        m.pos_enc.normal_(std=0.5)
    x = torch.randn(2, 13, 16)
    fast = m(x, lay)
    with record_attention(m):
        explicit = m(x, lay)
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("qkv_bias, focusing_factor", [(False, 3.0), (True, 2.0)])
def test_focused_linear_chunked_path_bias_free_and_focusing_factor(qkv_bias, focusing_factor, nan_fill):
    torch.manual_seed(0)
    hw, p = (5, 6), 1
    m = FocusedLinearAttention(24, 2, qkv_bias=qkv_bias, focusing_factor=focusing_factor,
                               num_tokens=31).eval()
    with torch.no_grad():
        m.scale_param.normal_(std=0.5)
        m.pos_enc.normal_(std=0.5)
    m.core.chunk_tokens = 7  # 5 chunks per image, the last one partial
    x = torch.randn(2, 31, 24)
    ref = m(x, TokenLayout(hw, p)).detach()  # autograd on: the unchunked path
    with torch.inference_mode():
        out = m(x, TokenLayout(hw, p))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("error")
def test_focused_feature_map_chunks_vectors_and_default_power(monkeypatch):
    import vitlab.layers.linear_attention as la

    torch.manual_seed(0)
    composed = lambda u, w, p=3.0: la.focusing_function(torch.addcmul(1e-6 * w, u.relu(), w), p)  # noqa: E731
    w = torch.rand(5, dtype=torch.float64) + 0.5
    u = torch.randn(5, dtype=torch.float64, requires_grad=True)  # one vector (odd width)
    torch.testing.assert_close(la.focused_feature_map(u, w), composed(u, w))
    torch.autograd.gradcheck(lambda a: la.focused_feature_map(a, w), (u,))
    monkeypatch.setattr(la, "_FOCUS_CHUNK_BYTES", 3 * 2 * 5 * 8)  # three rows of (2, 5) doubles per chunk
    u = torch.randn(4, 7, 2, 5, dtype=torch.float64, requires_grad=True)
    out = la.focused_feature_map(u, w, 2.0)
    torch.testing.assert_close(out, composed(u, w, 2.0))
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, u, g)[0], torch.autograd.grad(composed(u, w, 2.0), u, g)[0])


def test_focused_linear_without_a_layout_infers_the_square_grid():
    torch.manual_seed(0)
    m = FocusedLinearAttention(16, 2).eval()
    x = torch.randn(2, 16, 16)
    ref = m(x, TokenLayout((4, 4)))
    torch.testing.assert_close(m(x), ref)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)
    from vitlab.layers import record_attention
    with record_attention(m):
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="square token grid from 15 tokens"):
        m(x[:, :15])
    with pytest.raises(ValueError, match=r"grid \(3, 4\) holds 12 tokens, but 16"):
        m(x, TokenLayout((3, 4)))
    with pytest.raises(ValueError, match="built for 31 tokens, got 16"):
        FocusedLinearAttention(16, 2, num_tokens=31)(x)


def test_focused_linear_chunking_off_at_zero_and_with_a_hook_on_qkv(monkeypatch):
    torch.manual_seed(0)
    m = FocusedLinearAttention(16, 2).eval()
    x = torch.randn(1, 16, 16)
    m.core.chunk_tokens = 0  # 0: never chunk
    monkeypatch.setattr(type(m.core), "_chunked", lambda *a: pytest.fail("chunked path taken"))
    with torch.inference_mode():
        m(x)
    m.core.chunk_tokens = 4
    seen = []
    m.qkv.register_forward_hook(lambda mod, i, o: seen.append(o.shape))  # a hook must see the whole projection
    with torch.inference_mode():
        m(x)
    assert seen == [torch.Size([1, 16, 48])]


# -- attention parts: projections, groupings, layout errors ------------------------------------------
def test_projection_biases_default_on_and_switch_off():
    from vitlab.layers import MultiHeadAttention

    lay = TokenLayout((2, 2), 1)
    for proj, names in [("q_kv", ("q", "kv")), ("separate", ("q", "k", "v")), ("linear", ("qkv",))]:
        on = MultiHeadAttention(8, 2, projection=proj, layout=lay)
        off = MultiHeadAttention(8, 2, projection=proj, layout=lay, qkv_bias=False)
        assert all(getattr(on, n).bias is not None for n in names), proj
        assert all(getattr(off, n).bias is None for n in names), proj


def test_class_query_needs_a_prefix_token_and_parts_need_a_layout():
    from vitlab.layers import MultiHeadAttention

    m = MultiHeadAttention(8, 2, grouping="class_query", projection="separate")
    x = torch.randn(1, 5, 8)
    assert m(x, TokenLayout((2, 2), 1)).shape == (1, 1, 8)
    for lay in (None, TokenLayout((2, 2), 0)):
        with pytest.raises(ValueError, match="class-token queries need at least one prefix"):
            m(x[:, :4] if lay is not None else x, lay)
    with pytest.raises(ValueError, match=r"grouping 'window' needs the token layout .*; pass layout=TokenLayout"):
        MultiHeadAttention(8, 2, grouping="window")


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_linear_projection_with_reduced_keys_splits_the_qkv_weights(qkv_bias):
    """Queries from all tokens, keys and values from the reduced map, through the one ``qkv`` Linear."""
    from vitlab.layers import MultiHeadAttention

    torch.manual_seed(0)
    lay = TokenLayout((4, 4))
    m = MultiHeadAttention(8, 2, projection="linear", grouping="spatial_reduction", sr_ratio=2, layout=lay,
                           qkv_bias=qkv_bias).eval()
    if qkv_bias:
        with torch.no_grad():
            m.qkv.bias.normal_()
    x = torch.randn(2, 16, 8)
    kv_in = m.norm(m.sr(x.transpose(1, 2).reshape(2, 8, 4, 4)).flatten(2).transpose(1, 2))  # (2, 4, 8)
    q = nn.functional.linear(x, m.qkv.weight[:8], m.qkv.bias[:8] if qkv_bias else None)
    kv = nn.functional.linear(kv_in, m.qkv.weight[8:], m.qkv.bias[8:] if qkv_bias else None)
    heads = lambda t: t.view(2, -1, 2, 4).transpose(1, 2)  # noqa: E731
    k, v = heads(kv[..., :8]), heads(kv[..., 8:])
    a = (heads(q) @ k.transpose(-1, -2) / 2.0).softmax(-1)
    ref = m.proj((a @ v).transpose(1, 2).reshape(2, 16, 8))
    torch.testing.assert_close(m(x, lay), ref, atol=1e-5, rtol=1e-5)


def test_attention_repr_names_every_part_and_its_options():
    from vitlab.layers import MultiHeadAttention

    r = MultiHeadAttention(8, 2, core="cosine", tau=3.0, modifiers=("attnscale",)).extra_repr()
    assert r == ("dim=8, heads=2, head_dim=4, parts=[linear(qkv_bias=True, qk_norm=False, name='linear'), "
                 "global(name='global'), cosine(tau=3.0, learn_tau=False, normalize_v=False, eps=0.0, "
                 "learn_logit_scale=False, max_logit_scale=100.0, name='cosine'), attnscale(name='attnscale')]")


def test_spatial_reduction_linear_pool_and_recorded_key_grid():
    """PVTv2's linear SRA (7x7 average pool, 1x1 conv, norm, GELU) against a hand computation; the
    recorded maps carry the reduced key grid; without a layout the square grid is inferred."""
    from vitlab.layers import MultiHeadAttention, record_attention

    torch.manual_seed(0)
    lay = TokenLayout((14, 14))
    m = MultiHeadAttention(8, 2, projection="q_kv", grouping="spatial_reduction", linear=True, layout=lay).eval()
    x = torch.randn(1, 196, 8)
    fm = nn.functional.adaptive_avg_pool2d(x.transpose(1, 2).reshape(1, 8, 14, 14), 7)
    kv_in = nn.functional.gelu(m.norm(m.sr(fm).flatten(2).transpose(1, 2)))  # (1, 49, 8)
    heads = lambda t: t.view(1, -1, 2, 4).transpose(1, 2)  # noqa: E731
    kv = m.kv(kv_in)
    a = (heads(m.q(x)) @ heads(kv[..., :8]).transpose(-1, -2) / 2.0).softmax(-1)
    ref = m.proj((a @ heads(kv[..., 8:])).transpose(1, 2).reshape(1, 196, 8))
    with record_attention(m) as rec:
        torch.testing.assert_close(m(x, lay), ref, atol=1e-5, rtol=1e-5)
    assert rec.last_layouts()[""] == TokenLayout((7, 7)) and rec.last()[""].shape == (1, 2, 196, 49)
    m2 = MultiHeadAttention(8, 2, projection="q_kv", grouping="spatial_reduction", sr_ratio=2).eval()
    x = torch.randn(2, 16, 8)
    torch.testing.assert_close(m2(x), m2(x, TokenLayout((4, 4))))  # no layout: the square 4 x 4 grid
    m3 = MultiHeadAttention(8, 2, grouping="spatial_reduction", sr_ratio=1, core="focused_linear").eval()
    torch.testing.assert_close(m3(x), m3(x, TokenLayout((4, 4))))


# -- survivors of a mutation run over layers/dilated.py, unfold.py, offset_bias.py (2026-11-24) --------------
def test_unfold_takes_patch_one_and_non_square_patches():
    from vitlab.layers.layout import TokenLayout as Layout
    from vitlab.layers.unfold import UnfoldGrouping, fold_patches, patch_pair, unfold_patches

    assert patch_pair(1) == (1, 1) and patch_pair((1, 3)) == (1, 3)
    for bad in (0, (1, 0), (0, 2)):
        with pytest.raises(ValueError, match="patch_size must be positive"):
            patch_pair(bad)
    x = torch.randn(2, 6 * 8, 5)
    torch.testing.assert_close(unfold_patches(x, (6, 8), (1, 1)), x, rtol=0, atol=0)  # one group: the whole map
    g = unfold_patches(x, (6, 8), (3, 4))  # row b * 12 + (a * 4 + c): tokens (3i + a, 4j + c)
    want = torch.stack([x[b].view(6, 8, 5)[a::3, c::4].reshape(-1, 5) for b in range(2) for a in range(3)
                        for c in range(4)])
    torch.testing.assert_close(g, want, rtol=0, atol=0)
    torch.testing.assert_close(fold_patches(g, (6, 8), (3, 4)), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="a 6x8 map cannot be unfolded into 4x3 patches"):
        unfold_patches(x, (6, 8), (4, 3))
    assert UnfoldGrouping((3, 4)).key_grid(Layout((6, 8))) == ((2, 2), 0)
    assert UnfoldGrouping(2).key_grid(None) == (None, 0)


@pytest.mark.parametrize("grid", [(7, 7), (5, 6), (4, 4)])
def test_subsample_out_grid_is_the_query_map(grid):
    from vitlab.layers.offset_bias import SubsampleQueries

    g = SubsampleQueries(2)
    x = torch.randn(1, grid[0] * grid[1], 3)
    xq, xkv, _ = g.inputs(None, x, TokenLayout(grid))
    out = g.out_grid(grid)
    assert out == tuple(-(-n // 2) for n in grid) and xq.shape[1] == out[0] * out[1] and xkv is x
    if grid[0] == grid[1]:  # no layout: a square map is assumed
        torch.testing.assert_close(g.inputs(None, x, None)[0], xq)


def test_offset_bias_with_a_class_token_and_the_subsampled_indices():
    from vitlab.layers import MultiHeadAttention
    from vitlab.layers.offset_bias import offset_index

    m = MultiHeadAttention(8, 2, position="offset", layout=TokenLayout((3, 3), 1))
    torch.nn.init.normal_(m.attention_biases)
    from vitlab.layers.grouping import Branch

    q = torch.zeros(1, 2, 10, 4)
    b = m.positions[0].bias(m, Branch(q, q, q, slice(0, 2), (3, 3), 1))
    assert b.shape == (1, 2, 10, 10)
    assert torch.equal(b[0, :, 0], torch.zeros(2, 10)) and torch.equal(b[0, :, :, 0], torch.zeros(2, 10))
    for i in range(9):  # against a loop over offsets
        for j in range(9):
            k = abs(i // 3 - j // 3) * 3 + abs(i % 3 - j % 3)
            assert torch.equal(b[0, :, 1 + i, 1 + j], m.attention_biases[:, k])
    idx = offset_index((4, 5), 2)  # queries at (2r, 2c) of the 4x5 key map
    assert idx.shape == (2 * 3, 20)
    assert idx[4, 0] == 2 * 5 + 2 and idx[5, 19] == abs(2 - 3) * 5 + abs(4 - 4)
    with pytest.raises(ValueError, match="needs the token layout"):
        MultiHeadAttention(8, 2, position="offset")
