"""CSwin backbone ("CSWin Transformer", Dong et al., CVPR 2022) and its LipsFormer / FLatten recipes.

timm has no CSwin, so the cross-shaped attention is checked against a brute-force reference
(global attention masked to each stripe, LePE convolved stripe by stripe), the sizes against a
closed-form parameter count and the spec tables (shared/specs/lipsformer.md, flatten.md).
"""
import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import CenterNorm, CosineAttention, FocusedLinearAttention, record_attention
from vitlab.models.cli import count_macs, count_params
from vitlab.layers import Mlp, MixerSpec, MultiHeadAttention, TokenLayout
from vitlab.models.block import Block
from vitlab.models.cswin import CSwinTransformer, cswin_attention


def CSwinBlock(dim, hw, num_heads, split_size=7, lepe_div_heads=False, mixer="softmax", modifiers=()):
    """One CSwin block as the family builds it: the one Block with stripe attention plus LePE."""
    spec = MixerSpec(mixer, None, tuple(modifiers))
    att = cswin_attention(spec, split_size, False, lepe_div_heads)
    return Block(dim, spec.build(dim, num_heads, TokenLayout(hw), **att), Mlp(dim, 4 * dim))


def stripes_of(blk):
    g = blk.attn.grouping
    return g.stripes if hasattr(g, "stripes") else [tuple(blk.attn.layout.hw)]

CSWIN_T = "cswin_tiny_224"
# 64x64 input -> maps 16, 8, 4, 2; stripes 1, 2, 2 and a single branch in the last stage
SMALL = dict(img_size=64, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 2, 2),
             num_classes=5, drop_path_rate=0.0)


@contextlib.contextmanager
def cheap_init():
    """Skip the random initialisers (zero fill) while building full-size models for counting."""
    def zero(t, *args, **kwargs):
        with torch.no_grad():
            return t.zero_()

    with contextlib.ExitStack() as stack:
        for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_",
                     "xavier_normal_"):
            stack.enter_context(mock.patch.object(torch.nn.init, name, zero))
        yield


def cswin_param_count(c0=64, depths=(1, 2, 21, 1), num_classes=1000):
    """Closed form for the official CSwin layout: 7x7/4 stem + LN; per block LN, qkv, proj, LePE
    (depthwise 3x3 with bias on every channel), LN, MLP(4x); 3x3/2 merge + LN; final LN; head."""
    total = 3 * c0 * 49 + c0 + 2 * c0
    for i, d in enumerate(depths):
        c = c0 * 2 ** i
        if i:
            total += (c // 2) * c * 9 + c + 2 * c
        total += d * (12 * c * c + 23 * c)
    cf = c0 * 2 ** (len(depths) - 1)
    return total + 2 * cf + cf * num_classes + num_classes


# -- sizes ---------------------------------------------------------------------------------------
# (M params, GMACs): lipsformer.md reference numbers, flatten.md section 8; CSwin-T: the paper's
# 4.3 GFLOPs (its "23M" is rounded: the official layout has 22.32 M, checked in closed form below)
SPEC = {"lipsformer_cswin_tiny": (23.78, 4.67), "flatten_cswin_tiny": (21.20, 4.34), CSWIN_T: (None, 4.3)}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_params_and_macs_within_one_percent_of_spec(name):
    params, gmacs = SPEC[name]
    with cheap_init():
        model = vitlab.create_model(name, init="trunc_normal")
    if params is None:
        assert count_params(model) == cswin_param_count()
    else:
        assert count_params(model) / 1e6 == pytest.approx(params, rel=0.01)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_small_param_count_closed_form():
    model = vitlab.create_model(CSWIN_T, **SMALL)
    assert count_params(model) == cswin_param_count(16, SMALL["depths"], 5)


# -- the attention itself, against a brute-force reference ------------------------------------------
def reference_cross_attention(blk, x: torch.Tensor) -> torch.Tensor:
    """Global softmax attention masked to each token's stripe; LePE convolved on each stripe crop."""
    b, n, c = x.shape
    h, w = blk.attn.layout.hw
    nb, nh = len(stripes_of(blk)), blk.attn.num_heads
    d = c // nh
    q, k, v = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias).split(c, dim=-1)
    rows, cols = torch.arange(n) // w, torch.arange(n) % w
    outs = []
    for i, (sh, sw) in enumerate(stripes_of(blk)):
        same = (rows[:, None] // sh == rows[None] // sh) & (cols[:, None] // sw == cols[None] // sw)
        ch = slice(i * c // nb, (i + 1) * c // nb)
        heads = lambda t: t.reshape(b, n, nh // nb, d).transpose(1, 2)  # noqa: E731
        qb, kb, vb = heads(q[..., ch]), heads(k[..., ch]), heads(v[..., ch])
        if blk.attn.core.name == "cosine":  # LipsFormer: tau * cos(q, k)
            logits = float(blk.attn.tau) * F.normalize(qb, dim=-1) @ F.normalize(kb, dim=-1).transpose(-2, -1)
        else:
            logits = (qb @ kb.transpose(-2, -1)) * d ** -0.5
        p = logits.masked_fill(~same, float("-inf")).softmax(-1)
        if getattr(blk.attn, "attn_scale", None) is not None:  # AttnScale inside each stripe: p + w_h (p - 1/|stripe|)
            w_h = blk.attn.attn_scale.omega[i * nh // nb:(i + 1) * nh // nb].view(1, -1, 1, 1)
            p = p + w_h * (p - same.float() / same.sum(-1, keepdim=True))
        o = p @ vb
        vmap = v[..., ch].transpose(1, 2).reshape(b, c // nb, h, w)
        lepe = torch.zeros_like(vmap)
        for r0 in range(0, h, sh):
            for c0 in range(0, w, sw):
                lepe[..., r0:r0 + sh, c0:c0 + sw] = blk.attn.lepe[i](vmap[..., r0:r0 + sh, c0:c0 + sw])
        o = o + heads(lepe.flatten(2).transpose(1, 2))
        if blk.attn.positions[0].div_heads:
            o = o / math.sqrt(nh // nb)
        outs.append(o.transpose(1, 2).reshape(b, n, c // nb))
    return F.linear(torch.cat(outs, -1), blk.attn.proj.weight, blk.attn.proj.bias)


@pytest.mark.parametrize("split,div,mixer,hw", [(2, False, "softmax", (8, 8)), (1, False, "softmax", (8, 8)),
                                                (4, True, "cosine", (8, 8)), (8, False, "softmax", (8, 8)),
                                                (2, False, "attnscale", (8, 8)), (2, False, "softmax", (8, 4)),
                                                (2, False, "attnscale", (8, 4))])
def test_cross_shaped_attention_matches_masked_global_attention(split, div, mixer, hw):
    blk = CSwinBlock(16, hw, num_heads=4, split_size=split, lepe_div_heads=div, mixer=mixer).eval()
    with torch.no_grad():
        for conv in blk.attn.lepe:
            conv.bias.normal_()  # so a border/padding mistake in LePE shows
        if mixer == "attnscale":
            blk.attn.attn_scale.omega.copy_(torch.tensor([0.5, -0.3, 0.8, 0.2]))
    x = torch.randn(2, hw[0] * hw[1], 16)
    with torch.no_grad():
        got = blk.attn(x, blk.attn.layout)
        with record_attention(blk) as rec:
            recorded = blk.attn(x, blk.attn.layout)
    ref = reference_cross_attention(blk, x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recorded, ref, atol=1e-5, rtol=1e-5)
    maps = [tuple(m.shape) for m in rec.maps["attn"]]
    if split >= 8:  # the stripe covers the map: one branch, all heads
        assert stripes_of(blk) == [(8, 8)] and maps == [(2, 4, 64, 64)]
    elif hw[0] == hw[1]:  # one call: heads 0-1 in vertical (8 x split) stripes, 2-3 in horizontal ones
        s = 8 * split
        assert maps == [(2 * 8 // split, 4, s, s)]
    else:  # 8x4 map: vertical (8 x 2) stripes, then horizontal (2 x 4), two heads each
        assert maps == [(2 * 2, 2, 16, 16), (2 * 4, 2, 8, 8)]


def test_focused_linear_stage_is_global_linear_attention_plus_lepe():
    blk = CSwinBlock(16, (8, 8), num_heads=2, split_size=2, mixer="focused_linear").eval()
    with torch.no_grad():
        blk.attn.scale_param.normal_()
        blk.attn.pos_enc.normal_()
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        got = blk.attn(x, blk.attn.layout)
        v = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias)[..., 32:]
        lepe = blk.attn.lepe[0](v.transpose(1, 2).reshape(2, 16, 8, 8)).flatten(2).transpose(1, 2)
        plain = MultiHeadAttention(16, 2, core="focused_linear", layout=TokenLayout((8, 8)))
        plain.load_state_dict({k: v for k, v in blk.attn.state_dict().items() if "lepe" not in k})
        ref = plain(x) + lepe @ blk.attn.proj.weight.T  # global focused linear attention + LePE
    assert stripes_of(blk) == [(8, 8)]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# -- contract ----------------------------------------------------------------------------------------
def test_forward_intermediates_per_block_maps():
    model = vitlab.create_model(CSWIN_T, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inter = model.forward_halves(x)
        feats = model.forward_features(x)
        logits = model(x)
    assert len(inter) == 1 + 3 + 2 * sum(SMALL["depths"]) + 1  # + the final norm, what the head reads
    assert inter[-1].name == "norm" and inter[-1].kind == "norm"
    assert [i.name for i in inter[:4]] == ["patch_embed", "layers.0.blocks.0.attn", "layers.0.blocks.0.mlp",
                                           "layers.1.downsample"]
    for it in inter:
        side = 16 // 2 ** it.stage
        assert it.feature.shape == (2, 16 * 2 ** it.stage, side, side), it.name
    torch.testing.assert_close(model.norm(inter[-2].tokens), feats)
    torch.testing.assert_close(inter[-1].tokens, feats)
    torch.testing.assert_close(model.head(feats.mean(1)), logits)


def test_recording_is_per_stripe_and_does_not_change_the_output():
    model = vitlab.create_model(CSWIN_T, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        with record_attention(model) as rec:
            slow = model(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    shapes = {k: [tuple(t.shape) for t in v] for k, v in rec.maps.items()}
    assert shapes["layers.0.blocks.0.attn"] == [(32, 2, 16, 16)]  # 16 stripes of 16x1 (and 1x16) per image
    assert shapes["layers.2.blocks.0.attn"] == [(4, 4, 8, 8)]  # 4x4 map, stripes of width 2
    assert shapes["layers.3.blocks.0.attn"] == [(2, 4, 4, 4)]  # last stage: one branch
    for name, ms in rec.maps.items():
        for m in ms:
            torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)))
            if not name.startswith("layers.3"):  # never a whole-map matrix in two-branch stages
                res = model.layers[int(name.split(".")[1])].blocks[0].attn.layout.hw
                assert m.shape[-1] < res[0] * res[1]


# -- parts ----------------------------------------------------------------------------------------------
OVERRIDES = [
    dict(mixer="cosine"), dict(mixer="attnscale"), dict(mixer="focused_linear"), dict(norm="center"),
    dict(norm="rms"), dict(shortcut="weighted"), dict(shortcut="layerscale"), dict(featscale=True),
    dict(init="spectral"), dict(attn_type="LLSS"), dict(norm_layout="post"),
]


@pytest.mark.parametrize("over", OVERRIDES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_part_overrides_forward_backward(over):
    model = vitlab.create_model(CSWIN_T, **SMALL, **over)
    blk = model.layers[0].blocks[0]
    if over.get("mixer") == "focused_linear" or over.get("attn_type") == "LLSS":
        assert blk.attn.core.name == "focused_linear" and stripes_of(blk) == [(16, 16)]
    if over.get("mixer") == "cosine":
        assert blk.attn.core.name == "cosine"
    if over.get("norm") == "center":
        assert isinstance(blk.norm1, CenterNorm) and isinstance(model.layers[1].downsample.norm, CenterNorm)
    if over.get("init") == "spectral":
        assert torch.linalg.matrix_norm(blk.attn.lepe[0].weight.flatten(1), ord=2).item() == pytest.approx(1, abs=1e-4)
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    y.square().mean().backward()
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_combinations_raise_clear_errors():
    with pytest.raises(ValueError, match="num_heads=3 is odd"):
        vitlab.create_model(CSWIN_T, **{**SMALL, "num_heads": (2, 2, 3, 4), "embed_dim": 12})
    with pytest.raises(ValueError, match="stripes of width 3"):
        vitlab.create_model(CSWIN_T, **{**SMALL, "split_size": (1, 2, 3, 2)})
    with pytest.raises(ValueError, match="mixer='focused_linear' has linear cost"):
        vitlab.create_model(CSWIN_T, **SMALL, mixer="focused_linear", attn_type="LLSS")
    with pytest.raises(ValueError, match="talking_heads mixes heads, but stripes"):
        CSwinBlock(16, (8, 4), num_heads=4, split_size=2, modifiers=("talking_heads",))
    with pytest.raises(ValueError, match="stem_kernel"):
        vitlab.create_model(CSWIN_T, **SMALL, stem_kernel=5)
    with pytest.raises(ValueError, match="norm_layout"):
        vitlab.create_model(CSWIN_T, **SMALL, norm_layout="sandwich")
    model = vitlab.create_model(CSWIN_T, **SMALL)
    with pytest.raises(ValueError, match="img_size=96"):
        model(torch.randn(1, 3, 96, 96))


# -- resolution change ------------------------------------------------------------------------------------
def test_other_input_size_and_checkpoint_transfer():
    with torch.device("meta"):
        m384 = vitlab.create_model(CSWIN_T, img_size=384)
    stripes = [stripes_of(b) for s in m384.layers for b in s.blocks]
    assert stripes[3] == [(24, 12), (12, 24)] and stripes[-1] == [(12, 12)]  # CSWin@384: stripes 12
    assert m384.default_cfg["input_size"] == (3, 384, 384)
    # LePE and the convs do not depend on the size: a 64 checkpoint loads as is into a 96 model
    small = vitlab.create_model(CSWIN_T, **SMALL)
    big = vitlab.create_model(CSWIN_T, **{**SMALL, "img_size": 96})
    big.load_state_dict(small.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), big.state_dict().values()))
    assert big(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    # FLatten-CSwin: the key position encoding (1, H*W, C) of the linear stages is resized bicubically
    fl = vitlab.create_model("flatten_cswin_tiny", **SMALL)
    with torch.no_grad():
        fl.layers[0].blocks[0].attn.pos_enc.normal_()
    fl_big = vitlab.create_model("flatten_cswin_tiny", **{**SMALL, "img_size": 96})
    fl_big.load_state_dict(fl.state_dict())
    src = fl.layers[0].blocks[0].attn.pos_enc.reshape(1, 16, 16, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(src, size=(24, 24), mode="bicubic", antialias=True, align_corners=False)
    got = fl_big.layers[0].blocks[0].attn.pos_enc.reshape(1, 24, 24, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(got.detach(), ref.detach(), atol=1e-5, rtol=1e-5)


# -- recipes ---------------------------------------------------------------------------------------------
def test_lipsformer_cswin_recipe_follows_spec():
    model = vitlab.create_model("lipsformer_cswin_tiny", **SMALL)
    blocks = [b for s in model.layers for b in s.blocks]
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.layers[1].downsample.proj.kernel_size == (2, 2)
    assert isinstance(model.norm, torch.nn.Identity)  # no final norm
    for b in blocks:
        assert isinstance(b.norm1, torch.nn.Identity) and isinstance(b.norm2, CenterNorm)
        assert b.attn.core.name == "cosine" and float(b.attn.tau) == 12.0 and b.attn.positions[0].div_heads
        for g in (b.ls1.gamma, b.ls2.gamma, b.conv_units[0].alpha.gamma, b.conv_units[1].alpha.gamma):
            assert torch.allclose(g, torch.full_like(g, 0.2))
    # one CenterNorm at the end of the block: with every alpha 0 the block is CN(x)
    b = blocks[0]
    with torch.no_grad():
        for g in (b.ls1.gamma, b.ls2.gamma, b.conv_units[0].alpha.gamma, b.conv_units[1].alpha.gamma):
            g.zero_()
        x = torch.randn(2, 256, 16)
        torch.testing.assert_close(b(x, b.attn.layout), b.norm2(x))


def test_flatten_cswin_recipe_layout():
    with torch.device("meta"):
        model = vitlab.create_model("flatten_cswin_tiny")
    assert isinstance(model, CSwinTransformer)
    depths = [len(s.blocks) for s in model.layers]
    assert depths == [2, 4, 18, 1]
    for i, s in enumerate(model.layers):
        for b in s.blocks:
            assert (b.attn.core.name == "focused_linear") == (i < 2)
            side = 56 // 2 ** i
            assert stripes_of(b) == ([(side, side)] if i in (0, 1, 3) else [(14, 7), (7, 14)])
    assert "cswin_tiny_224" in vitlab.list_models("*cswin*")
    assert {"lipsformer_cswin_tiny", "flatten_cswin_tiny"} <= set(vitlab.list_models("*cswin*"))


def test_official_checkpoint_key_layout_round_trip():
    """Keys of the official CSwin code: stage1_conv_embed.{0,2}, stage{s}.{j}.{qkv, norm1, proj,
    attns.{b}.get_v, mlp.fc1, mlp.fc2, norm2}, merge{i}.{conv, norm}, norm, head."""
    from vitlab.models.cswin import cswin_from_official, cswin_to_official

    depths = (1, 2, 21, 1)
    expected = {f"stage1_conv_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for s, d in enumerate(depths, start=1):
        for j in range(d):
            subs = ["qkv", "norm1", "proj", "mlp.fc1", "mlp.fc2", "norm2"]
            subs += [f"attns.{b}.get_v" for b in range(1 if s == 4 else 2)]
            expected |= {f"stage{s}.{j}.{m}.{p}" for m in subs for p in ("weight", "bias")}
        if s > 1:
            expected |= {f"merge{s - 1}.{m}.{p}" for m in ("conv", "norm") for p in ("weight", "bias")}
    expected |= {f"{m}.{p}" for m in ("norm", "head") for p in ("weight", "bias")}
    with torch.device("meta"):
        model = vitlab.create_model(CSWIN_T)
    official = cswin_to_official(model.state_dict())
    assert set(official) == expected
    assert official["stage3.20.attns.1.get_v.weight"].shape == (128, 1, 3, 3)
    small = vitlab.create_model(CSWIN_T, **SMALL)
    back = cswin_from_official({"state_dict_ema": cswin_to_official(small.state_dict())})
    other = vitlab.create_model(CSWIN_T, **SMALL)
    other.load_state_dict(back)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), small.eval()(x))
