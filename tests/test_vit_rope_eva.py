"""timm's sbb ViTs with EVA-02 RoPE (``vit_*_patch16_rope_reg*_gap_256``, timm's ``Eva``): the ``rope`` part's
options ``rope_order`` / ``rope_ref_grid`` against the rotation written out from the formula and against timm's
``RotaryEmbeddingCat``, the q/v-only qkv bias (projection ``linear_qv_bias``) against an explicit computation,
exact counts and keys vs timm on ``meta``, timm parity both ways with every parameter randomised, and the options
in another backbone (PVTv2)."""
import itertools
import math

import pytest
import torch

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.rope import axial_angles, rotate_pairs
from parity import check_parity, randomize_, timm_pair, on_meta

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["vit_medium_patch16_rope_reg1_gap_256", "vit_mediumd_patch16_rope_reg1_gap_256",
         "vit_betwixt_patch16_rope_reg4_gap_256", "vit_base_patch16_rope_reg1_gap_256"]
EVA = dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=(16, 16))  # what the four recipes use


def _by_formula(t, grid, theta, order, ref):
    """Each token's channel pairs ``(t[2p], t[2p+1])`` turned by ``c_a * theta ** (-j / m)``: pair block ``b`` of
    ``m = d / (2 * rank)`` pairs reads axis ``a = b`` ("yx") or ``rank - 1 - b`` ("xy"), ``c_a`` the token's index
    along it, times ``ref[a] / grid[a]`` when a reference grid is given.  float64, one token at a time."""
    rank, d = len(grid), t.shape[-1]
    m = d // (2 * rank)
    out = torch.empty_like(t)
    for n, idx in enumerate(itertools.product(*map(range, grid))):
        for p in range(d // 2):
            b, j = divmod(p, m)
            a = b if order == "yx" else rank - 1 - b
            c = idx[a] * (ref[a] / grid[a] if ref is not None else 1.0)
            ang = c * theta ** (-j / m)
            x0, x1 = t[..., n, 2 * p], t[..., n, 2 * p + 1]
            out[..., n, 2 * p], out[..., n, 2 * p + 1] = (x0 * math.cos(ang) - x1 * math.sin(ang),
                                                         x0 * math.sin(ang) + x1 * math.cos(ang))
    return out


@pytest.mark.parametrize("grid, d, ref", [((3, 5), 12, None), ((3, 5), 12, (4, 7)), ((2, 3, 4), 12, (3, 5, 6))])
@pytest.mark.parametrize("order", ["xy", "yx"])
@pytest.mark.parametrize("theta", [100.0, 10000.0])
def test_rope_options_equal_the_rotation_written_out(grid, d, ref, order, theta):
    t = torch.randn(2, math.prod(grid), d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = rotate_pairs(t, axial_angles(grid, d, theta, order, ref).double())
    torch.testing.assert_close(got, _by_formula(t, grid, theta, order, ref), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("grid, ref", [((3, 5), (16, 16)), ((16, 16), (16, 16)), ((4, 2), (6, 9))])
def test_yx_order_with_reference_grid_equals_timm_rotary_embedding_cat(grid, ref):
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat

    d = 16
    emb = RotaryEmbeddingCat(d, temperature=10000.0, in_pixels=False, feat_shape=list(grid), ref_feat_shape=list(ref))
    t = torch.randn(2, 3, math.prod(grid), d, generator=torch.Generator().manual_seed(1))
    want = apply_rot_embed_cat(t, emb.get_embed())
    torch.testing.assert_close(rotate_pairs(t, axial_angles(grid, d, 10000.0, "yx", ref)), want)
    # the default order (x first) and unscaled indices are other rotations: timm's is not a coincidence
    assert (rotate_pairs(t, axial_angles(grid, d, 10000.0, "xy", ref)) - want).abs().max() > 1e-2
    if grid != ref:
        assert (rotate_pairs(t, axial_angles(grid, d, 10000.0, "yx")) - want).abs().max() > 1e-2


def test_rope_option_forms_and_errors():
    layout = TokenLayout((2, 3))
    one, per_axis = (MultiHeadAttention(16, 2, position=(("rope", dict(EVA, rope_ref_grid=r)),), layout=layout)
                     for r in (6, (6, 6)))
    per_axis.load_state_dict(one.state_dict())
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(one(x), per_axis(x))  # one size: the same on every axis
    with pytest.raises(ValueError, match="rope_order must be 'xy'.*got 'zy'"):
        MultiHeadAttention(16, 2, position=(("rope", {"rope_order": "zy"}),), layout=layout)
    with pytest.raises(ValueError, match=r"rope_ref_grid must be a positive size.*\(0, 4\)"):
        MultiHeadAttention(16, 2, position=(("rope", {"rope_ref_grid": (0, 4)}),), layout=layout)
    with pytest.raises(ValueError, match=r"rope_ref_grid \(4.0, 4.0, 4.0\) must give one size or one per axis"):
        MultiHeadAttention(24, 2, position=(("rope", {"rope_ref_grid": (4, 4, 4)}),), layout=layout)


def _rotated_grid(t):
    """``t (B, H, 1 + 6, 8)`` with its 2x3 grid tokens rotated as EVA's rope: each token's rotation matrix is
    :func:`_by_formula` applied to the basis vectors (``m[e, n]`` = token ``n``'s image of ``e``)."""
    m = _by_formula(torch.eye(8, dtype=torch.float64)[:, None].expand(8, 6, 8), (2, 3), 1e4, "yx", (16, 16))
    return torch.cat([t[:, :, :1], torch.einsum("bhne,enf->bhnf", t[:, :, 1:], m.float())], 2)


def test_qv_bias_projection_with_eva_rope_equals_attention_written_out():
    """BEiT/EVA qkv: ``x W^T + [b_q, 0, b_v]``; rope on the grid tokens only (one register token kept)."""
    torch.manual_seed(0)
    layout = TokenLayout((2, 3), 1)
    attn = MultiHeadAttention(16, 2, projection="linear_qv_bias", position=(("rope", EVA),), layout=layout)
    assert {n for n, _ in attn.named_parameters()} == {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"}
    assert "k_bias" not in attn.state_dict() and not attn.k_bias.any()
    with torch.no_grad():
        attn.q_bias.normal_(), attn.v_bias.normal_()
    x = torch.randn(2, 7, 16)
    qkv = torch.einsum("bnc,oc->bno", x, attn.qkv.weight) + torch.cat([attn.q_bias, torch.zeros(16), attn.v_bias])
    q, k, v = qkv.reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    p = torch.einsum("bhqd,bhkd->bhqk", _rotated_grid(q), _rotated_grid(k)).mul(8 ** -0.5).softmax(-1)
    want = attn.proj(torch.einsum("bhqk,bhkd->bqhd", p, v).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
    with record_attention(attn) as rec:
        attn(x)
    torch.testing.assert_close(next(iter(rec.last().values())), p, atol=1e-5, rtol=1e-5)
    plain = MultiHeadAttention(16, 2, projection="linear_qv_bias", qkv_bias=False, layout=layout)
    assert {n for n, _ in plain.named_parameters()} == {"qkv.weight", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("name", NAMES)
def test_default_size_counts_keys_and_data_config_equal_timm(name):
    ours, ref = on_meta(vitlab.create_model, name), on_meta(timm.create_model, name)
    assert type(ours).__name__ == "Eva"
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in to_timm_state_dict(ours).items()} == want
    for key in ("input_size", "num_classes", "crop_pct", "interpolation"):
        assert ours.default_cfg[key] == ref.pretrained_cfg[key], key
    for key in ("mean", "std"):
        assert ours.default_cfg[key] == pytest.approx(ref.pretrained_cfg[key]), key


@pytest.mark.parametrize("name, kw", [
    ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=48, embed_dim=64, num_heads=2)),  # 3x3 grid: scale 16/3
    ("vit_mediumd_patch16_rope_reg1_gap_256", dict(img_size=32, embed_dim=64, num_heads=4)),  # no qkv bias
    ("vit_betwixt_patch16_rope_reg4_gap_256", dict(img_size=32, embed_dim=80, num_heads=5)),  # 4 registers
    ("vit_base_patch16_rope_reg1_gap_256", dict(img_size=32, embed_dim=48, num_heads=3, dynamic_img_size=True)),
])
def test_parity_with_timm_every_parameter_randomised(name, kw):
    """Logits and block maps equal to timm's both ways (2 blocks); the dynamic one on a 3x2 grid (48x32 input)."""
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(3)) if kw.get("dynamic_img_size") else None
    check_parity(name, depth=2, x=x, **kw)


def test_parity_needs_both_options():
    """The same randomised timm weights in vitlab with x-first pairs or with unscaled indices: other logits."""
    name, kw = "vit_medium_patch16_rope_reg1_gap_256", dict(img_size=48, embed_dim=64, num_heads=2, depth=2)
    ref, ours = timm_pair(name, **kw)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=1e-5)
        for changed in (dict(EVA, rope_order="xy"), dict(EVA, rope_ref_grid=None)):
            other = vitlab.create_model(name, **kw, attn_position=(("rope", changed),))
            load_timm_weights(other, ref.state_dict())
            assert (other.eval()(x) - want).abs().max() > 1e-3, changed


def test_model_contract_on_a_small_eva():
    m = vitlab.create_model("vit_betwixt_patch16_rope_reg4_gap_256", img_size=32, depth=2, embed_dim=32, num_heads=2,
                            num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    m(x).square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]
    final, feats = m.forward_intermediates(x, indices=[0, 1])
    assert final.shape == (2, 4 + 4, 32) and [f.shape for f in feats] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(m.forward_head(m.forward_features(x)), m(x))
    with record_attention(m) as rec:
        m(x)
    assert len(rec.last()) == 2
    assert {"reg_token"} <= set(m.no_weight_decay()) and m.group_matcher()["stem"]
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.default_cfg["input_size"] == (3, 32, 32)


def test_eva_rope_options_in_pvt_v2():
    """PVTv2 with full-resolution keys (sr_ratios 1) trains with the options (each stage's grid rescaled to the
    reference); with its default spatially reduced keys the part is refused by the capability check."""
    small = dict(img_size=64, embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 1, 1, 1))
    rope = (("rope", dict(EVA, rope_ref_grid=(4, 4))),)
    m = randomize_(vitlab.create_model("pvt_v2_b0", **small, sr_ratios=(1, 1, 1, 1), mixer_kwargs=dict(position=rope)))
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and not [n for n, p in m.named_parameters() if p.grad is None]
    assert sum(1 for mod in m.modules() if any(p.name == "rope" for p in getattr(mod, "positions", ()))) == 5
    xy = vitlab.create_model("pvt_v2_b0", **small, sr_ratios=(1, 1, 1, 1),
                             mixer_kwargs=dict(position=(("rope", dict(EVA, rope_ref_grid=(4, 4), rope_order="xy")),)))
    xy.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (xy(x) - out).abs().max() > 1e-2 * out.abs().max()  # the same weights, x-first pairs: another model
    with pytest.raises(ValueError, match="position bias 'rope' cannot be combined with grouping 'spatial_reduction'"):
        vitlab.create_model("pvt_v2_b0", **small, mixer_kwargs=dict(position=rope))


def _lr_scale_and_decay(model, rename=lambda n: n):
    """``{timm parameter name: (lr scale, weight decay)}`` from timm's optimizer factory with layer decay."""
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_layer_decay_and_weight_decay_groups_equal_timm():
    """timm's no_weight_decay (reg_token included) and group_matcher give the same optimizer groups."""
    kw = dict(img_size=32, depth=3, embed_dim=32, num_heads=2)
    ours = vitlab.create_model("vit_betwixt_patch16_rope_reg4_gap_256", **kw)
    ref = timm.create_model("vit_betwixt_patch16_rope_reg4_gap_256", **kw)
    rename = dict(zip(ours.state_dict(), to_timm_state_dict(ours))).get
    got, want = _lr_scale_and_decay(ours, rename), _lr_scale_and_decay(ref)
    assert got == want and want["reg_token"][1] == 0.0 and len({s for s, _ in want.values()}) > 3


def test_init_matches_timm_eva_statistics():
    """From scratch, vitlab's Eva starts as timm's ``Eva.init_weights``: per block ``l`` the ratio std(attn.proj) /
    std(qkv) and std(mlp.fc2) / std(mlp.fc1) is ``1 / sqrt(2 l)`` in both, the register token has std 0.02 and
    the head 0.02 * 0.001 (vitlab's ViT init instead gives the token 1e-6 and no depth scaling)."""
    import timm

    torch.manual_seed(0)
    kw = dict(depth=4, num_classes=1000)
    ours, ref = vitlab.create_model(NAMES[2], **kw), timm.create_model(NAMES[2], **kw)
    for model in (ours, ref):
        for depth, block in enumerate(model.blocks, start=1):
            want = 1 / math.sqrt(2 * depth)
            ratios = (block.attn.proj.weight.std() / block.attn.qkv.weight.std(),
                      block.mlp.fc2.weight.std() / block.mlp.fc1.weight.std())
            assert [r.item() for r in ratios] == pytest.approx([want, want], rel=0.03)
        assert model.reg_token.std().item() == pytest.approx(0.02, rel=0.15)  # 4 x 640 draws
        assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    plain = vitlab.create_model(NAMES[2], init="xavier", **kw)  # a chosen initialiser is applied as chosen
    assert (plain.blocks[3].attn.proj.weight.std() / plain.blocks[3].attn.qkv.weight.std()).item() > 0.6
