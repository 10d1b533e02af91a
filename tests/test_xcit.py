"""XCiT: the cross-covariance core against an explicit d x d einsum, its capability refusals and its use in
other backbones, the Block's third branch, timm parity (every parameter randomised), timm's and the paper's
parameter counts, and the model contract against timm's ``Xcit``."""
import re

import pytest
import torch
from torch import nn

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.xcit_parts import FourierPositionEncoding, LocalPatchInteraction
from vitlab.models.block import Block
from vitlab.models.parts_table import FAMILY_EXAMPLES

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=64, depth=2)


def xca_by_einsum(x, qkv: nn.Linear, proj: nn.Linear, temperature, heads):
    """XC-Attention written out (El-Nouby et al., 2021, eq. 3-4): per head, channels of q and k scaled to unit
    norm over the tokens, A = softmax(tau * q^T k) (d x d), output channel i = sum_j A[i, j] v[:, j]."""
    b, n, c = x.shape
    d = c // heads
    q, k, v = (t.reshape(b, n, heads, d) for t in qkv(x).split(c, dim=-1))
    q = q / q.pow(2).sum(dim=1, keepdim=True).sqrt()  # over the tokens n
    k = k / k.pow(2).sum(dim=1, keepdim=True).sqrt()
    logits = torch.einsum("bnhi,bnhj->bhij", q, k) * temperature.reshape(1, heads, 1, 1)
    a = logits.softmax(dim=-1)
    out = torch.einsum("bhij,bnhj->bnhi", a, v).reshape(b, n, c)
    return proj(out), a


def _xca(dim=32, heads=4, **kw):
    torch.manual_seed(1)
    m = MultiHeadAttention(dim, heads, core="cross_covariance", **kw)
    with torch.no_grad():
        m.temperature.uniform_(0.3, 3.0)  # per head, so a wrong head index shows
    return m


def test_xca_core_equals_the_explicit_d_by_d_formula_and_records_it():
    m = _xca()
    x = torch.randn(2, 17, 32)
    want, a = xca_by_einsum(x, m.qkv, m.proj, m.temperature, 4)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    q, k, v = m.core.prepare(m, *m.projection(m, x, x))  # the core's kernel on its own, all heads
    fused = m.core.fused(m, q, k, v, None, 0.0).transpose(1, 2).reshape(2, 17, 32)
    torch.testing.assert_close(m.proj(fused), want, atol=1e-5, rtol=1e-5)
    with record_attention(m) as rec:
        got = m(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    probs = rec.last()[""]
    assert probs.shape == (2, 4, 8, 8) and rec.last_layouts()[""] is None  # channels, not tokens
    torch.testing.assert_close(probs, a, atol=1e-6, rtol=1e-5)
    assert [n for n, _ in m.named_parameters()] == ["temperature", "qkv.weight", "qkv.bias", "proj.weight",
                                                    "proj.bias"]  # timm XCA's keys
    m(x).square().sum().backward()
    assert m.temperature.grad is not None and m.temperature.grad.abs().min() > 0


def test_xca_heads_of_a_branch_use_their_own_temperature():
    """CSwin's stripes put heads 0-1 and 2-3 in two branches: the second branch must read temperatures 2-3."""
    m = _xca(grouping="stripes", split_size=2, layout=TokenLayout((4, 4)))
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(32)), m.proj.bias.zero_()
    x = torch.randn(2, 16, 32)
    base = m(x)
    with torch.no_grad():
        m.temperature[3] += 1.0
    moved = (m(x) - base).abs().amax(dim=(0, 1)).reshape(4, 8).amax(dim=1)
    assert moved[:3].max() == 0 and moved[3] > 1e-4, moved


def test_xca_refuses_what_needs_the_matrix_a_logit_bias_or_other_queries():
    for mod in ("talking_heads", "attnscale"):  # AttnScale needs no matrix, but acts on token attention
        with pytest.raises(ValueError, match=f"core 'cross_covariance' cannot be combined with modifier '{mod}': "
                                             "cross_covariance attends over channels"):
            _xca(modifiers=(mod,))
    with pytest.raises(ValueError, match="cross_covariance takes no additive logit bias"):
        _xca(grouping=("window", dict(window_size=2)), position=("relative",), layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="cross_covariance cannot take the shifted-window mask"):
        _xca(grouping=("window", dict(window_size=2, shift=True)), layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="'cross_covariance' cannot be combined with grouping 'class_query'"):
        _xca(grouping="class_query", projection="separate", layout=TokenLayout((4, 4), 1))
    m = _xca(grouping=("spatial_reduction", dict(sr_ratio=2)), layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="same tokens, got 16 query and 4 key tokens"):
        m(torch.randn(1, 16, 32))


@pytest.mark.parametrize("family", sorted(FAMILY_EXAMPLES))
def test_cross_covariance_core_in_every_family(family):
    """Like tests/test_parts_matrix.py: forward and backward finite, every parameter reached, the core used --
    or CaiT's one-line refusal (its talking heads need the matrix)."""
    name, small, size = FAMILY_EXAMPLES[family]
    refusals = {"cait": "cross_covariance attends over channels .*; talking_heads acts on the attention between tokens",
                "navit": "core 'cross_covariance' takes no attention mask",  # NaViT masks across packed images
                "levit": "cross_covariance takes no additive logit bias",  # LeViT's offset bias
                "regionvit": "cross_covariance takes no additive logit bias",  # RegionViT's relative table
                "convit": "cross_covariance attends over channels .*; gpsa acts on the attention between tokens"}
    if family in refusals:
        with pytest.raises(ValueError, match=refusals[family]):
            vitlab.create_model(name, **small, core="cross_covariance")
        return
    m = vitlab.create_model(name, **small, core="cross_covariance").train()
    out = m(torch.randn(2, *size))
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]
    cores = [mod.core.name for mod in m.modules() if isinstance(mod, MultiHeadAttention)]
    # + XCiT's class attention, CrossViT's class-token fusion
    own = {"cross_covariance", "softmax"} if family in ("xcit", "crossvit") else {"cross_covariance"}
    assert cores and "cross_covariance" in cores and set(cores) <= own, cores


# -- the Block's third branch -------------------------------------------------------------------------
def _block_parts(dim=16):
    attn = MultiHeadAttention(dim, 2)
    mlp = vitlab.layers.Mlp(dim, 2 * dim)
    return attn, mlp


def test_block_without_local_mixer_keeps_its_keys_and_its_function():
    torch.manual_seed(0)
    attn, mlp = _block_parts()
    blk = Block(16, attn, mlp, branch_scale="layerscale", branch_scale_init=0.5).eval()
    assert not any(k.startswith(("norm3", "local_mp", "ls3")) for k in blk.state_dict())
    x, lay = torch.randn(2, 9, 16), TokenLayout((3, 3))
    h = x + 0.5 * attn(blk.norm1(x), lay)
    torch.testing.assert_close(blk(x, lay), h + 0.5 * mlp(blk.norm2(h)))


def test_block_third_branch_is_x_plus_ls3_of_local_mixer_of_norm3():
    torch.manual_seed(0)
    attn, mlp = _block_parts()
    lpi = LocalPatchInteraction(16)
    blk = Block(16, attn, mlp, branch_scale="layerscale", local_mixer=lpi).eval()
    for p in blk.parameters():
        nn.init.normal_(p, std=0.3)
    lpi.bn.running_var.uniform_(0.5, 2.0), lpi.bn.running_mean.normal_()
    x, lay = torch.randn(2, 1 + 9, 16), TokenLayout((3, 3), 1)
    g1, g3, g2 = blk.ls1.gamma, blk.ls3.gamma, blk.ls2.gamma
    h = x + g1 * attn(blk.norm1(x), lay)
    fm = blk.norm3(h)[:, 1:].transpose(1, 2).reshape(2, 16, 3, 3)  # LPI by hand: dw conv, GELU, BN, dw conv
    y = nn.functional.conv2d(fm, lpi.conv1.weight, lpi.conv1.bias, padding=1, groups=16)
    y = nn.functional.batch_norm(nn.functional.gelu(y), lpi.bn.running_mean, lpi.bn.running_var, lpi.bn.weight,
                                 lpi.bn.bias, eps=lpi.bn.eps)
    y = nn.functional.conv2d(y, lpi.conv2.weight, lpi.conv2.bias, padding=1, groups=16).flatten(2).transpose(1, 2)
    h = h + g3 * torch.cat([torch.zeros(2, 1, 16), y], dim=1)  # the class token passes the local branch
    torch.testing.assert_close(blk(x, lay), h + g2 * mlp(blk.norm2(h)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="local_mixer needs wiring 'pre' or 'post'"):
        Block(16, attn, mlp, wiring="prefix", local_mixer=lpi)


def test_fourier_position_encoding_matches_timm():
    from timm.models.xcit import PositionalEncodingFourier

    torch.manual_seed(0)
    ours, ref = FourierPositionEncoding(24), PositionalEncodingFourier(dim=24)
    ref.load_state_dict(ours.state_dict())
    want = ref(1, 3, 5).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours((3, 5)), want)


# -- the model against timm ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_tiny_12_p16_224", "xcit_nano_12_p8_224",
                                  "xcit_tiny_12_p8_224"])
def test_xcit_timm_parity_both_directions(name):
    from parity import check_parity

    # nano: class norm only in the class-attention blocks; tiny: tokens_norm; every parameter randomised
    rep = check_parity(name, **SMALL)
    assert rep.intermediates and rep.logits_scale > 0.1


def test_every_timm_xcit_name_is_registered_with_timm_parameter_count_and_the_paper_size():
    names = vitlab.list_models("xcit*")
    assert sorted(names) == sorted(timm.list_models("xcit*")) and len(names) == 28
    paper = {"nano_12": 3, "tiny_12": 7, "tiny_24": 12, "small_12": 26, "small_24": 48, "medium_24": 84,
             "large_24": 189}  # El-Nouby et al., 2021, Table 1: parameters in millions
    for name in names:
        with torch.device("meta"):
            n = sum(p.numel() for p in vitlab.create_model(name).parameters())
            assert n == sum(p.numel() for p in timm.create_model(name).parameters()), name
        assert round(n / 1e6) == paper[re.match(r"xcit_(\w+?_\d+)_p", name).group(1)], (name, n)


@pytest.fixture(scope="module")
def nano_pair():
    from parity import timm_pair

    return timm_pair("xcit_nano_12_p16_224", img_size=64, depth=3)


def test_contract_matches_timm(nano_pair):
    ref, ours = nano_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for kw in (dict(), dict(indices=2, norm=True), dict(indices=[0], output_fmt="NLC", stop_early=True)):
            want_x, want = ref.forward_intermediates(x, **kw)
            got_x, got = ours.forward_intermediates(x, **kw)
            assert len(got) == len(want), kw
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
            if not kw.get("stop_early"):
                torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
        y = torch.randn(1, 3, 96, 80)  # any size divisible by the patch: no position table to resize
        torch.testing.assert_close(ours(y), ref(y), atol=1e-4, rtol=1e-5)
    assert ours.feature_info == ref.feature_info and ours.group_matcher() == ref.group_matcher()
    assert ours.default_cfg["input_size"] == (3, 64, 64) and ours.pretrained_cfg["crop_pct"] == 1.0
    nwd = ours.no_weight_decay()
    assert {"cls_token", "pos_embed.token_projection.weight", "blocks.0.attn.temperature"} <= nwd
    assert "blocks.0.attn.qkv.weight" not in nwd


def test_recording_halves_and_classifier(nano_pair):
    ref, ours = nano_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), record_attention(ours) as rec:
        y = ours(x)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    maps = rec.last()
    assert maps["blocks.0.attn"].shape == (2, 4, 32, 32)  # d x d per head (128 channels / 4 heads)
    assert maps["cls_attn_blocks.1.attn"].shape == (2, 4, 1, 1 + 16)  # the class token over all tokens
    for p in maps.values():
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    halves = ours.forward_halves(x)
    assert [h.kind for h in halves] == ["embed"] + ["attn", "mlp"] * 5
    last = halves[-1]
    torch.testing.assert_close(ours.head(ours.norm(last.all_tokens)[:, 0]), y, atol=1e-5, rtol=1e-5)
    m = vitlab.create_model("xcit_nano_12_p16_224", img_size=32, depth=1, cls_attn_layers=1)
    m.reset_classifier(7, global_pool="avg")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="global_pool='seqpool'"):
        m.reset_classifier(3, global_pool="seqpool")


def test_xcit_training_step_and_parts():
    m = vitlab.create_model("xcit_nano_12_p8_224", img_size=32, depth=2, embed_dim=32, num_heads=2,
                            drop_path_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1).train()
    m(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]
    assert {b.drop_path1.drop_prob for b in m.blocks} == {0.1}  # XCiT's rule: one rate in every XCA block
    soft = vitlab.create_model("xcit_nano_12_p16_224", img_size=32, depth=1, mixer="softmax")
    assert {a.core.name for a in soft.modules() if isinstance(a, MultiHeadAttention)} == {"softmax"}
    with pytest.raises(ValueError, match="power-of-two patch size"):
        vitlab.create_model("xcit_nano_12_p16_224", img_size=48, patch_size=12)
    with pytest.raises(ValueError, match="global_pool"):
        vitlab.create_model("xcit_nano_12_p16_224", global_pool="max")
