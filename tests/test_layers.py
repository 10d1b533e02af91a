"""Every part against an independent computation (closed forms, brute-force einsum)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.layers import TokenLayout
from vitlab.layers import (AttnScale, CenterNorm, CosineAttention, FeatScale, FocusedLinearAttention, ChannelScale,
                           create_mixer, create_norm, create_shortcut, focusing_function, record_attention,
                           spectral_init_, sincos_2d)
from vitlab.layers.attention import Attention


def split_heads(t, h):
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def merge_heads(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


# -- norms -------------------------------------------------------------------------------------
def test_centernorm_spec_vector():
    cn = CenterNorm(4)
    out = cn(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.allclose(out, torch.tensor([[-2.0, -2 / 3, 2 / 3, 2.0]]), atol=1e-6)


def test_centernorm_closed_form_with_affine():
    d = 16
    cn = CenterNorm(d)
    with torch.no_grad():
        cn.weight.normal_()
        cn.bias.normal_()
    x = torch.randn(3, 5, d) * 7 + 3
    ref = cn.weight * (d / (d - 1)) * (x - x.mean(-1, keepdim=True)) + cn.bias
    assert torch.allclose(cn(x), ref, atol=1e-5)
    # Lipschitz constant: D/(D-1) * max|gamma|, attained on a zero-mean direction when gamma is constant
    assert cn.lipschitz_constant() == pytest.approx(d / (d - 1) * cn.weight.abs().max().item())


@pytest.mark.parametrize("name,cls", [("layernorm", nn.LayerNorm), ("center", CenterNorm), ("rms", nn.RMSNorm)])
def test_norm_registry(name, cls):
    assert isinstance(create_norm(name, 8), cls)


def test_rms_norm_closed_form():
    x = torch.randn(4, 8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(create_norm("rms", 8)(x), ref, atol=1e-5)


# -- attention mixers --------------------------------------------------------------------------
def brute_softmax_attention(m: Attention, x, logits_fn):
    q, k, v = (split_heads(t, m.num_heads) for t in m.qkv(x).chunk(3, dim=-1))
    logits = logits_fn(q, k)
    a = logits.softmax(-1)
    return a, m.proj(merge_heads(torch.einsum("bhij,bhjd->bhid", a, v)))


def test_softmax_attention_matches_einsum_and_records():
    m = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 10, 32)
    a_ref, out_ref = brute_softmax_attention(m, x, lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8))
    assert torch.allclose(m(x), out_ref, atol=1e-5)
    with record_attention(m) as rec:
        out = m(x)
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(rec.last()[""], a_ref, atol=1e-6)


def test_softmax_attention_matches_timm_attention():
    from timm.models.vision_transformer import Attention as TimmAttention

    ours, theirs = Attention(48, num_heads=6, qk_norm=True).eval(), TimmAttention(48, num_heads=6, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    with torch.no_grad():  # every parameter random (timm's init leaves biases at zero and norms at one)
        for p in ours.parameters():
            p.normal_(0.5 if p.ndim == 1 else 0.0, 0.2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 48)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_cosine_attention_matches_einsum():
    tau = 12.0
    m = CosineAttention(32, num_heads=4, tau=tau).eval()
    x = torch.randn(2, 9, 32)

    def logits(q, k):
        cos = torch.einsum("bhid,bhjd->bhij", q, k) / (q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :])
        return tau * cos

    a_ref, out_ref = brute_softmax_attention(m, x, logits)
    assert torch.allclose(m(x), out_ref, atol=1e-5)
    with record_attention(m) as rec:
        m(x)
    assert torch.allclose(rec.last()[""], a_ref, atol=1e-6)


def test_cosine_logits_bounded_by_tau():
    m = CosineAttention(16, num_heads=2, tau=10.0)
    x = torch.randn(3, 20, 16) * 100
    q, k, _ = m.core.prepare(m, *m.projection(m, x, x))
    lg = m.core.logits(m, q, k)
    assert lg.abs().max() <= 10.0 + 1e-4


def test_cosine_attention_eps_and_learnable_tau_gradient():
    m = CosineAttention(16, num_heads=2, tau=10.0, learn_tau=True, eps=1e-6)
    x = torch.randn(2, 5, 16)
    m(x).sum().backward()
    assert m.tau.grad is not None and m.tau.grad.abs() > 0
    # recorded path and fused path agree with learnable tau too
    with torch.no_grad():
        fused = m(x)
        with record_attention(m):
            explicit = m(x)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_attnscale_matches_einsum_and_hc_identity():
    m = create_mixer("attnscale", 32, num_heads=4).eval()
    with torch.no_grad():
        m.attn_scale.omega.copy_(torch.tensor([0.5, -0.3, 2.0, 0.0]))
    x = torch.randn(2, 11, 32)
    q, k, v = (split_heads(t, 4) for t in m.qkv(x).chunk(3, dim=-1))
    a = (torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8)).softmax(-1)
    omega = m.attn_scale.omega.view(1, 4, 1, 1)
    a_hat = a + omega * (a - 1.0 / 11)
    ref = m.proj(merge_heads(a_hat @ v))
    assert torch.allclose(m(x), ref, atol=1e-5)
    with record_attention(m) as rec:
        m(x)
    p = rec.last()[""]
    assert torch.allclose(p, a_hat, atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)  # rows still sum to 1
    # HC[A_hat X] = (1 + omega) HC[A X]
    hc = lambda t: t - t.mean(dim=-2, keepdim=True)  # noqa: E731
    assert torch.allclose(hc(a_hat @ v), (1 + omega) * hc(a @ v), atol=1e-5)


def test_attnscale_uniform_attention_gives_dc():
    s = AttnScale(3)
    with torch.no_grad():
        s.omega.copy_(torch.tensor([1.0, -0.7, 5.0]))
    a = torch.full((1, 3, 6, 6), 1 / 6)
    x = torch.randn(1, 3, 6, 4)
    out = s(a) @ x
    assert torch.allclose(out, x.mean(dim=-2, keepdim=True).expand_as(out), atol=1e-6)


def test_focusing_function_spec_vector():
    out = focusing_function(torch.tensor([1.0, 2.0, 0.5, 0.0]), 3.0)
    assert torch.allclose(out, torch.tensor([0.28417, 2.27332, 0.03552, 0.0]), atol=1e-4)
    assert out.norm().item() == pytest.approx(2.291288, abs=1e-5)
    x = torch.rand(5, 7)
    assert torch.allclose(focusing_function(x, 1.0), x, atol=1e-6)  # f_1 is the identity
    for p in (2.0, 3.0, 6.0):
        assert torch.allclose(focusing_function(x, p).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def explicit_flatten(m: FocusedLinearAttention, x, hw, num_prefix=0):
    """The explicit N x N matrix of the same kernel, plus the DWC term, written independently."""
    b, n, c = x.shape
    h, d = m.num_heads, m.head_dim
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    k = k + m.pos_enc
    div = F.softplus(m.scale_param)

    def phi(t):
        t = (F.relu(t) + 1e-6) / div
        tp = t ** 3
        return tp * t.norm(dim=-1, keepdim=True) / tp.norm(dim=-1, keepdim=True)

    qh, kh, vh = split_heads(phi(q), h), split_heads(phi(k), h), split_heads(v, h)
    a = torch.einsum("bhid,bhjd->bhij", qh, kh)
    a = a / (a.sum(-1, keepdim=True) + n * 1e-6)  # released normaliser: 1 / (q . mean_j k_j + 1e-6)
    out = a @ vh
    vp = vh[:, :, num_prefix:].reshape(b * h, hw[0], hw[1], d).permute(0, 3, 1, 2)
    dw = F.conv2d(vp, m.dwc.weight, m.dwc.bias, padding=m.dwc.padding, groups=d)
    dw = dw.permute(0, 2, 3, 1).reshape(b, h, hw[0] * hw[1], d)
    out[:, :, num_prefix:] += dw
    return a, m.proj(merge_heads(out))


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_focused_linear_matches_explicit_matrix(num_prefix):
    hw = (6, 5)
    n = hw[0] * hw[1] + num_prefix
    m = FocusedLinearAttention(32, num_heads=4, num_tokens=n).eval()
    with torch.no_grad():  # non-trivial learned parameters
        m.pos_enc.normal_(std=0.5)
        m.scale_param.normal_(std=0.5)
    x = torch.randn(2, n, 32, dtype=torch.float64)
    m = m.double()
    a_ref, out_ref = explicit_flatten(m, x, hw, num_prefix)
    out = m(x, layout=TokenLayout(hw, num_prefix))
    assert (out - out_ref).abs().max() < 1e-5
    with record_attention(m) as rec:
        out_rec = m(x, layout=TokenLayout(hw, num_prefix))
    assert (rec.last()[""] - a_ref).abs().max() < 1e-5
    assert (out_rec - out_ref).abs().max() < 1e-5
    # float32 fast path against the float64 reference
    m32 = m.float()
    assert (m32(x.float(), layout=TokenLayout(hw, num_prefix)) - out_ref.float()).abs().max() < 1e-4


def test_focused_linear_rank():
    m = FocusedLinearAttention(64, num_heads=4, num_tokens=196).eval()  # head dim 16
    x = torch.randn(1, 196, 64)
    with record_attention(m) as rec:
        m(x, TokenLayout((14, 14)))
    a = rec.last()[""][0, 0].double()
    assert torch.linalg.matrix_rank(a, rtol=1e-5) <= 16  # phi(Q) phi(K)^T has rank <= head dim
    # with the DWC the operator V -> A V + DWC(V) on one channel becomes full rank
    w = m.dwc.weight[0, 0].double()
    dwc = torch.zeros(196, 196, dtype=torch.float64)
    for i in range(196):
        r, c = divmod(i, 14)
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                rr, cc = r + dr, c + dc
                if 0 <= rr < 14 and 0 <= cc < 14:
                    dwc[i, rr * 14 + cc] = w[dr + 2, dc + 2]
    assert torch.linalg.matrix_rank(a + dwc, rtol=1e-5) == 196


def test_focused_linear_zero_inits():
    m = FocusedLinearAttention(16, num_heads=2, num_tokens=9)
    assert torch.count_nonzero(m.pos_enc) == 0 and torch.count_nonzero(m.scale_param) == 0
    assert F.softplus(m.scale_param).flatten()[0].item() == pytest.approx(0.693147, abs=1e-6)


def test_focused_linear_refuses_logit_bias_and_shift_mask():
    from vitlab.layers import MultiHeadAttention

    with pytest.raises(ValueError, match="core 'focused_linear' cannot be combined with position bias 'relative'"):
        MultiHeadAttention(16, 2, core="focused_linear", position="relative", layout=TokenLayout((2, 2)))
    with pytest.raises(ValueError, match="focused_linear.*shifted-window mask"):
        MultiHeadAttention(16, 2, core="focused_linear", grouping="window", window_size=2, shift=True,
                           layout=TokenLayout((4, 4)))


@pytest.mark.parametrize("part", [dict(core="focused_linear"), dict(position="lepe")])
@pytest.mark.parametrize("grouping,prefix", [(("spatial_reduction", {"sr_ratio": 2}), 0),
                                             (("spatial_reduction", {"linear": True}), 0), ("class_query", 1),
                                             (("spatial_reduction", {"sr_ratio": 1}), 0)])
def test_value_map_parts_need_keys_that_are_the_queries(part, grouping, prefix):
    # the DWC / LePE term is computed on V's map and added to the query rows: with reduced keys this was a raw
    # shape error, with class queries a silently broadcast (N + 1)-row output
    from vitlab.layers import MultiHeadAttention

    build = lambda: MultiHeadAttention(16, 2, grouping=grouping, layout=TokenLayout((8, 8), prefix), **part)
    if grouping[1] == {"sr_ratio": 1}:
        assert build()(torch.randn(2, 64, 16)).shape == (2, 64, 16)
        return
    with pytest.raises(ValueError, match="adds a term from the value map to each query row"):
        build()


def test_softmax_uses_sdpa_fast_path_only_when_not_recording(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for name in ("softmax", "cosine", "attnscale"):
        m = create_mixer(name, 16, num_heads=2).eval()
        calls.clear()
        m(torch.randn(1, 5, 16))
        assert calls, f"{name} did not use SDPA"
        calls.clear()
        with record_attention(m):
            m(torch.randn(1, 5, 16))
        assert not calls, f"{name} used SDPA while recording"


# -- FeatScale, shortcuts ------------------------------------------------------------------------
def test_featscale_identity_and_frequency_gains():
    fs = FeatScale(8)
    x = torch.randn(2, 10, 8)
    assert torch.equal(fs(x), x)
    with torch.no_grad():
        fs.s.normal_()
        fs.t.normal_()
    y = fs(x)
    dc, hc = x.mean(1, keepdim=True), x - x.mean(1, keepdim=True)
    assert torch.allclose(y.mean(1, keepdim=True), (1 + fs.s) * dc, atol=1e-5)
    assert torch.allclose(y - y.mean(1, keepdim=True), (1 + fs.t) * hc, atol=1e-5)


def test_shortcuts():
    x = torch.randn(3, 4, 6)
    assert isinstance(create_shortcut("plain", 6), nn.Identity)
    w = create_shortcut("weighted", 6, depth=12)
    assert torch.allclose(w.gamma, torch.full((6,), 1 / 12)) and torch.allclose(w(x), x / 12)
    ls = create_shortcut("layerscale", 6)
    assert torch.allclose(ls.gamma, torch.full((6,), 1e-5))
    assert create_shortcut("layerscale", 6, init_value=1e-6).gamma[0].item() == pytest.approx(1e-6)


def test_lipsformer_weighted_shortcut_init_is_one_over_depth():
    m = vitlab.create_model("lipsformer_vit_small", depth=4, embed_dim=64, num_heads=2, img_size=32, num_classes=3)
    gammas = [mod.gamma for mod in m.modules() if isinstance(mod, ChannelScale)]
    assert len(gammas) == 4 * 4  # two conv units + attention + MLP per block
    assert all(torch.allclose(g, torch.full_like(g, 0.25)) for g in gammas)


# -- initialisers ----------------------------------------------------------------------------
def test_spectral_init_sets_every_spectral_norm_to_one():
    m = vitlab.create_model("lipsformer_vit_small", depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=10)
    mats = [mod.weight for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert len(mats) > 10
    for w in mats:
        assert torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item() == pytest.approx(1.0, abs=1e-4)
    lin_biases = [mod.bias for mod in m.modules() if isinstance(mod, nn.Linear) and mod.bias is not None]
    assert all(torch.count_nonzero(b) == 0 for b in lin_biases)
    spectral_init_(m)  # re-running keeps sigma_1 = 1
    assert all(torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item() == pytest.approx(1.0, abs=1e-4)
               for w in mats)


def test_trunc_normal_and_xavier_init_statistics():
    import timm

    torch.manual_seed(0)
    m = vitlab.create_model("vit_small_patch16_224", depth=2)
    ref = timm.create_model("vit_small_patch16_224", depth=2).blocks[0].mlp.fc1.weight  # timm's own init
    for w in (m.blocks[0].mlp.fc1.weight, m.blocks[1].attn.qkv.weight, ref):
        # N(0, 0.02) cut at +-2 (absolute, timm's call): std 0.02 and a normal tail beyond 2 sigma (4.6 %); cut
        # at +-2 sigma the std would be 0.0176 and the tail empty
        assert w.std().item() == pytest.approx(0.02, rel=0.02)
        assert (w.abs() > 0.04).float().mean().item() == pytest.approx(0.0455, abs=0.005)
    m = vitlab.create_model("vit_small_patch16_224", depth=2, init="xavier")
    w = m.blocks[0].mlp.fc1.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_sincos_2d_closed_form():
    pe = sincos_2d((3, 4), 8)
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    y, x = 2, 3  # token 11 in raster order
    ref = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)])
    assert torch.allclose(pe[11], ref, atol=1e-6)


def test_cosine_attention_learnable_tau_fast_path_equals_explicit():
    """With a learnable tau folded into q for SDPA, the fast path equals the recorded explicit
    path and tau receives the gradient of the closed form d/dtau."""
    torch.manual_seed(0)
    m = CosineAttention(32, num_heads=4, tau=7.0, learn_tau=True)
    x = torch.randn(2, 10, 32)
    fast = m(x)
    fast.sum().backward()
    g_fast = m.tau.grad.clone()
    m.tau.grad = None
    with vitlab.layers.record_attention(m) as rec:
        slow = m(x)
    (probs,) = rec.last().values()  # the explicit path ran (and recorded its probabilities)
    assert probs.shape == (2, 4, 10, 10) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 10))
    slow.sum().backward()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast, m.tau.grad, atol=1e-4, rtol=1e-4)
    assert g_fast.abs() > 0 and m.scale == 1.0
    assert CosineAttention(32, 4, tau=12.0).scale == 12.0


def test_fused_feature_map_equals_composed_ops_and_gradchecks(monkeypatch):
    """focused_feature_map (hand-written backward, row chunks) = focusing_function of
    (relu(u) + 1e-6) * inv, values and gradients for u and inv, on a non-contiguous split view."""
    import vitlab.layers.linear_attention as la
    from vitlab.layers.linear_attention import focused_feature_map

    monkeypatch.setattr(la, "_FOCUS_CHUNK_BYTES", 2 * 12 * 8 * 3)  # 3 tokens per chunk: several chunks
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 36, dtype=torch.float64, requires_grad=True)
    inv = (torch.rand(1, 1, 12, dtype=torch.float64) + 0.5).requires_grad_()

    def fused(a, w):
        return focused_feature_map(a.split([24, 12], dim=-1)[0].unflatten(-1, (2, 12)), w, 3.0)

    def composed(a, w):
        u = a.split([24, 12], dim=-1)[0].unflatten(-1, (2, 12))
        return focusing_function(torch.addcmul(1e-6 * w, F.relu(u), w), 3.0)

    assert torch.autograd.gradcheck(fused, (qkv, inv))
    g = torch.randn(2, 7, 2, 12, dtype=torch.float64)
    out_f, out_c = fused(qkv, inv), composed(qkv, inv)
    assert (out_f - out_c).abs().max() < 1e-12
    for a, b in zip(torch.autograd.grad(out_f, (qkv, inv), g), torch.autograd.grad(out_c, (qkv, inv), g)):
        assert (a - b).abs().max() < 1e-10
    with pytest.raises(ValueError, match="one value per channel"):
        focused_feature_map(torch.rand(3, 12), torch.rand(5))


def test_feature_map_of_a_row_with_no_positive_entry_is_finite_in_float32():
    """All of a row negative gives ``t = 1e-6 inv``: ``|t**3|`` underflows float32 (found by the catalogue
    test: FLatten-PVT at width 8 had non-finite stem gradients).  Values and gradients stay finite and equal
    the float64 ones (the map is scale-free in t, so the row is a finite unit direction times |t|)."""
    from vitlab.layers.linear_attention import focused_feature_map

    torch.manual_seed(0)
    u = torch.cat([-torch.rand(3, 8, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)])
    inv = torch.rand(8, dtype=torch.float64) * 0.5 + 0.1
    g = torch.randn(4, 8, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        for fn in (lambda a, w: focused_feature_map(a, w, 3.0),
                   lambda a, w: focusing_function(torch.addcmul(1e-6 * w, F.relu(a), w), 3.0)):
            a, w = u.to(dtype).clone().requires_grad_(), inv.to(dtype).clone().requires_grad_()
            y = fn(a, w)
            y.backward(g.to(dtype))
            assert torch.isfinite(y).all() and torch.isfinite(a.grad).all() and torch.isfinite(w.grad).all()
            grads.append(w.grad.double())
    for got in grads[:3]:
        torch.testing.assert_close(got, grads[3], rtol=1e-4, atol=1e-6)


# -- tests added for surviving mutants (mutmut over cores, modifiers, position parts) --------------
def test_cosine_eps_normalisation_is_the_paper_form():
    """With eps > 0, q and k are divided by sqrt(|q|^2 + eps) (LipsFormer's globally Lipschitz form)."""
    from vitlab.layers import TokenLayout  # noqa: F401

    tau, eps = 10.0, 0.5
    m = CosineAttention(8, num_heads=2, tau=tau, eps=eps).eval()
    x = torch.randn(2, 5, 8) * 0.3  # small tokens: eps matters
    q, k, _ = m.core.prepare(m, *m.projection(m, x, x))
    raw_q, raw_k, _ = m.projection(m, x, x)
    ref = lambda t: t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + eps)  # noqa: E731
    torch.testing.assert_close(q, ref(raw_q))
    torch.testing.assert_close(k, ref(raw_k))


def test_learnable_tau_scales_the_cosine_logits():
    """A learnable tau multiplies the cosine logits (not divides): checked against einsum."""
    m = CosineAttention(8, num_heads=2, tau=3.0, learn_tau=True).eval()
    x = torch.randn(1, 4, 8)
    raw_q, raw_k, v = (t.detach() for t in m.projection(m, x, x))
    cos = torch.einsum("bhid,bhjd->bhij", F.normalize(raw_q, dim=-1), F.normalize(raw_k, dim=-1))
    with record_attention(m) as rec:
        m(x)
    torch.testing.assert_close(rec.last()[""], (3.0 * cos).softmax(-1), atol=1e-6, rtol=1e-5)


def test_attnscale_with_fewer_keys_than_queries():
    """AttnScale's 1/N is over the keys (spatially reduced: N_k < N_q), on both paths."""
    from vitlab.layers import MultiHeadAttention, TokenLayout

    layout = TokenLayout((4, 4))
    m = MultiHeadAttention(8, 2, projection="q_kv", grouping="spatial_reduction", sr_ratio=2,
                           modifiers=("attnscale",), layout=layout).eval()
    with torch.no_grad():
        m.attn_scale.omega.copy_(torch.tensor([0.7, -0.4]))
    x = torch.randn(2, 16, 8)
    with record_attention(m) as rec:
        explicit = m(x, layout)
    probs = rec.last()[""]  # (2, 2, 16, 4)
    fm = x.transpose(1, 2).reshape(2, 8, 4, 4)
    kv_in = m.norm(m.sr(fm).flatten(2).transpose(1, 2))
    q = m.q(x).view(2, 16, 2, 4).transpose(1, 2)
    k = m.kv(kv_in).view(2, 4, 2, 2, 4).permute(2, 0, 3, 1, 4)[0]
    a = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    w = m.attn_scale.omega.view(1, 2, 1, 1)
    torch.testing.assert_close(probs, a + w * (a - 1.0 / 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, layout), explicit, atol=1e-5, rtol=1e-5)  # fused path: same operator


def test_lepe_leaves_prefix_tokens_out_of_the_conv():
    """LePE on a map with a class token: the conv sees the grid only; the class token gets no term."""
    from vitlab.layers import MultiHeadAttention, TokenLayout

    layout = TokenLayout((3, 3), 1)
    m = MultiHeadAttention(8, 2, position=("lepe",), layout=layout).eval()
    with torch.no_grad():
        m.lepe[0].bias.normal_()
    x = torch.randn(1, 10, 8)
    plain = MultiHeadAttention(8, 2, layout=layout).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "lepe" not in k})
    v = m.qkv(x)[..., 16:]
    lepe = m.lepe[0](v[:, 1:].transpose(1, 2).reshape(1, 8, 3, 3)).flatten(2).transpose(1, 2)
    ref = plain(x, layout) + torch.cat([torch.zeros(1, 1, 8), lepe], 1) @ m.proj.weight.T
    torch.testing.assert_close(m(x, layout), ref, atol=1e-5, rtol=1e-5)


def test_cosine_normalize_v_normalises_the_values():
    """``normalize_v`` (the paper form): V is unit-normalised per head before ``A V``."""
    m = CosineAttention(8, num_heads=2, tau=5.0, normalize_v=True).eval()
    x = torch.randn(1, 4, 8) * 3
    _, _, v = m.core.prepare(m, *m.projection(m, x, x))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(1, 2, 4))


def test_attention_dropout_acts_in_training_on_the_fused_path():
    """attn_drop reaches SDPA in training (two calls differ) and is off in eval (calls agree)."""
    from vitlab.layers import MultiHeadAttention

    m = MultiHeadAttention(8, 2, attn_drop=0.5)
    x = torch.randn(2, 6, 8)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_relative_position_table_starts_as_trunc_normal_0_02():
    from vitlab.layers import MultiHeadAttention, TokenLayout

    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2, grouping="window", window_size=7, position="relative", layout=TokenLayout((14, 14)))
    t = m.relative_position_bias_table
    assert t.shape == (13 * 13, 2) and 0.015 < t.std().item() < 0.025  # std 0.02 (not 1: a default init)


def test_small_biased_attention_is_written_out_and_equals_sdpa(monkeypatch):
    """Up to EXPLICIT_BIAS_LOGITS a CPU attention with a relative table skips SDPA (faster there); the output is
    SDPA's to float rounding, and a larger map, or no bias, still takes SDPA."""
    import vitlab.layers.mha as mha
    from vitlab.layers import MultiHeadAttention

    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2, position="relative", layout=TokenLayout((4, 4))).eval()
    torch.nn.init.normal_(m.relative_position_bias_table)
    x = torch.randn(2, 16, 16)
    small = m(x)
    assert not calls
    monkeypatch.setattr(mha, "EXPLICIT_BIAS_LOGITS", 15)  # force SDPA on the same module (16 x 16 logits)
    torch.testing.assert_close(m(x), small, rtol=1e-5, atol=1e-6)
    assert calls
    calls.clear()
    monkeypatch.setattr(mha, "EXPLICIT_BIAS_LOGITS", 196 * 196)
    MultiHeadAttention(16, 2).eval()(x)  # no bias: SDPA
    assert calls
