"""Swin Transformer V2 ("Swin Transformer V2: Scaling Up Capacity and Resolution", Liu et al., CVPR 2022).

Checked against timm's ``swinv2_*`` (randomised weights, logit scales and CPB MLPs included; both directions;
parameter counts of every registered name), the continuous position bias against a loop over offsets, the cosine
core's clamped per-head logit scale against the formula, the ``res_post`` wiring against its equation, and the new
parts in every family (or refused with one clear error).
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.layers import Mlp, MultiHeadAttention, TokenLayout
from vitlab.layers.grouping import Branch
from vitlab.models.block import Block
from vitlab.models.parts_table import FAMILY_EXAMPLES
from vitlab.models.swinv2 import SwinTransformerV2
from parity import check_parity, randomize_, swin_official_layout, timm_pair
from test_parts_matrix import run_or_refused

pytestmark = pytest.mark.usefixtures("one_thread")

V2_T = "swinv2_tiny_window8_256"
# 32x32 input, patch 4 -> maps 8x8 and 4x4
SMALL = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=7,
             drop_path_rate=0.0)
TIMM_NAMES = sorted(n for n in timm.list_models("swinv2*") if not n.startswith("swinv2_cr"))


# -- timm parity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over", [
    {},                                                       # 2x2 windows of 4 (shifted), then one 4x4 window
    dict(window_size=2, pretrained_window_sizes=(4, 3)),      # fine-tuned from other windows; both stages shifted
    dict(img_size=40),                                        # 10x10 and 5x5 maps: padded windows, padded merging
], ids=["w4", "w2_pretrained", "padded"])
def test_timm_parity_both_directions(over):
    rep = check_parity(V2_T, **{**SMALL, **over})
    assert len(rep.intermediates) == 2 and rep.worst() < 1e-4  # the two stage maps (features: below)


def test_pretrained_window_sizes_change_the_bias():
    """The parity case above could not tell if the pre-training window were ignored: it changes the logits."""
    ref, ours = timm_pair(V2_T, **{**SMALL, "window_size": 2, "pretrained_window_sizes": (4, 3)})
    plain = vitlab.create_model(V2_T, **{**SMALL, "window_size": 2}).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (plain(x) - ours(x)).abs().max() > 1e-3
        assert (ref(x) - ours(x)).abs().max() < 1e-4
        # forward_features: timm's (B, H, W, C) map, vitlab's (B, H*W, C) tokens in raster order
        assert (ref.forward_features(x).flatten(1, 2) - ours.forward_features(x)).abs().max() < 1e-4


def test_logit_scale_clamp_matches_timm():
    """Per-head logit scales on both sides of the clamp log(100): equal logits; above it nothing changes."""
    ref, ours = timm_pair(V2_T, **SMALL)
    with torch.no_grad():
        for blk in (b for s in ref.layers for b in s.blocks):
            blk.attn.logit_scale.copy_(torch.tensor([0.5, 5.0]).view(2, 1, 1))
    load_timm_weights(ours, ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = ref(x), ours(x)
        assert (want - got).abs().max() < 1e-4
        ours.layers[0].blocks[0].attn.logit_scale[1] = 9.0  # still above the clamp: the same logits
        torch.testing.assert_close(ours(x), got, rtol=0, atol=0)
        ours.layers[0].blocks[0].attn.logit_scale[0] = 1.5  # below it: different logits
        assert (ours(x) - got).abs().max() > 1e-4


def test_official_checkpoint_layout_loads():
    """The official repository merges at the end of stage i, names the classifier ``head`` and saved buffers."""
    ref = randomize_(timm.create_model(V2_T, pretrained=False, **SMALL)).eval()
    official = swin_official_layout(ref.state_dict())
    official["layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(1)
    ours = load_timm_weights(vitlab.create_model(V2_T, **SMALL), {"model": official}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-5


# -- sizes and recipes -----------------------------------------------------------------------------------------
def test_registered_names_are_timms():
    assert sorted(vitlab.list_models("swinv2*")) == TIMM_NAMES


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_param_count_and_keys_equal_timm(name):
    with torch.device("meta"):
        ours = vitlab.create_model(name)
        ref = timm.create_model(name, pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert set(to_timm_state_dict(ours)) == set(ref.state_dict())
    assert ours.default_cfg["input_size"] == ref.pretrained_cfg["input_size"]
    assert ours.default_cfg["crop_pct"] == ref.pretrained_cfg["crop_pct"] and ours.num_classes == ref.num_classes
    assert {n for n in ref.no_weight_decay()} <= ours.no_weight_decay()
    blk = ours.layers[3].blocks[0].attn
    assert blk.core.name == "cosine" and [p.name for p in blk.positions] == ["cpb"]
    assert blk.grouping.window == ref.layers[3].blocks[0].window_size
    assert blk.positions[0].pretrained == ref.layers[3].blocks[0].attn.pretrained_window_size


def test_fresh_blocks_are_the_identity():
    """res-post norms start at zero (weight and bias), as the official code and timm: every block passes x."""
    model = vitlab.create_model(V2_T, **SMALL)
    x = torch.randn(2, 64, 16)
    for blk in model.layers[0].blocks:
        assert blk.wiring == "res_post"
        torch.testing.assert_close(blk(x, blk.attn.layout), x, rtol=0, atol=0)
    merge = model.layers[1].downsample
    assert merge.norm_after and merge.norm.normalized_shape == (32,)


# -- parts -----------------------------------------------------------------------------------------------------
def _offset(d: int, side: int) -> float:
    t = d / max(side - 1, 1) * 8
    return math.copysign(math.log2(abs(t) + 1) / 3, t) if t else 0.0


@pytest.mark.parametrize("pretrained", [0, (6, 5)])
def test_cpb_table_equals_a_loop_over_offsets(pretrained):
    """16 sigmoid(MLP(log-spaced (dy, dx))) for every query-key pair of a 3x4 group (built) and a 2x3 one (per
    call), class-token rows and columns zero (Liu et al., 2022, eq. 4)."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, position=(("cpb", dict(pretrained_window_size=pretrained)),),
                              layout=TokenLayout((3, 4), 1))
    with torch.no_grad():
        for p in attn.cpb_mlp.parameters():
            p.normal_(0, 0.5)
    part = attn.positions[0]
    sides = (pretrained if pretrained else None)
    for grid in ((3, 4), (2, 3)):
        n = grid[0] * grid[1]
        branch = Branch(*(torch.zeros(1, 2, n + 1, 4),) * 3, slice(0, 2), grid, 1)
        got = part.bias(attn, branch)
        want = torch.zeros(1, 2, n + 1, n + 1)
        sh, sw = sides or grid
        for i in range(n):
            for j in range(n):
                dy, dx = i // grid[1] - j // grid[1], i % grid[1] - j % grid[1]
                inp = torch.tensor([_offset(dy, sh), _offset(dx, sw)])
                want[0, :, 1 + i, 1 + j] = 16 * torch.sigmoid(attn.cpb_mlp(inp))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        one = Branch(*(torch.zeros(1, 1, n + 1, 4),) * 3, slice(1, 2), grid, 1)  # a branch of head 1 only
        torch.testing.assert_close(part.bias(attn, one), want[:, 1:], atol=1e-5, rtol=1e-5)


def test_cosine_logit_scale_is_clamped_per_head():
    """exp(min(logit_scale, log 100)) per head, starting at log(tau); above the clamp no gradient (Liu et al.,
    2022, sec. 3.2, eq. 2); the attention equals the formula written out."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, core=("cosine", dict(learn_logit_scale=True, tau=10.0)),
                              layout=TokenLayout((2, 2)))
    torch.testing.assert_close(attn.logit_scale.detach().flatten(), torch.full((2,), math.log(10)))
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([1.0, 6.0]).view(2, 1, 1))
    torch.testing.assert_close(attn.core.head_scale(attn).detach().flatten(), torch.tensor([math.e, 100.0]))
    assert float(attn.tau) == 100.0  # the bound every head stays under (what Lipschitz bounds read)
    x = torch.randn(2, 4, 8)
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(2, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    probs = (cos * torch.tensor([math.e, 100.0]).view(1, 2, 1, 1)).softmax(-1)
    want = attn.proj((probs @ v).transpose(1, 2).reshape(2, 4, 8))
    out = attn(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    g = attn.logit_scale.grad.flatten()
    assert g[0].abs() > 0 and g[1] == 0
    with pytest.raises(ValueError, match="learn_logit_scale needs learn_tau=False"):
        MultiHeadAttention(8, 2, core=("cosine", dict(learn_logit_scale=True, learn_tau=True)))


def test_res_post_wiring_is_its_equation():
    """x + ls1(norm1(attn(x))), then x + ls2(norm2(mlp(x))): norms on the branch outputs (sec. 3.2)."""
    torch.manual_seed(0)
    lay = TokenLayout((4, 4))
    blk = Block(16, MultiHeadAttention(16, 2, layout=lay), Mlp(16, 32), wiring="res_post", branch_scale="layerscale",
                branch_scale_init=0.5)
    randomize_(blk)
    x = torch.randn(2, 16, 16)
    h = x + blk.ls1(blk.norm1(blk.attn(x, lay)))
    with torch.no_grad():
        torch.testing.assert_close(blk(x, lay), h + blk.ls2(blk.norm2(blk.mlp(h))))
        torch.testing.assert_close(blk.attn_half(x, lay), h)


# families that refuse a part, with the words of the one-line error
CPB_REFUSED = {
    "swinv2": ("already on this attention",),
    "cswin": ("stripes", "one grid"),
    "xcit": ("cross_covariance", "no additive logit bias"),
    "video": ("2-D attention groups",),
    "levit": ("subsample", "queries are not the keys"),
    "cvt": ("projection 'conv'",),
    **{f: ("spatial_reduction", "queries are not the keys") for f in ("pvt", "pvt_v2", "twins")},
    "scalablevit": ("scalable_reduction", "queries are not the keys"),
}
RES_POST_REFUSED = {"cswin": ("norm_layout",), "levit": ("not defined for LeViT",),
                    "alternet": ("not defined for AlterNet",)}


@pytest.mark.parametrize("family", FAMILY_EXAMPLES)
def test_cpb_and_res_post_in_every_family_or_refused(family):
    for key, value, refused in (("attn_position", ("cpb",), CPB_REFUSED), ("wiring", "res_post", RES_POST_REFUSED)):
        model = run_or_refused(family, refused.get(family), value[0] if key == "attn_position" else value,
                               **{key: value})
        if model is None:
            continue
        mods = list(model.modules())
        if key == "wiring":
            assert any(getattr(m, "wiring", None) == "res_post" for m in mods)
        else:
            assert any("cpb" in [p.name for p in getattr(m, "positions", None) or []] for m in mods)


def test_swinv2_parts_are_replaceable():
    """Another core replaces the cosine (no logit scale then); a linear-cost stage has no windows and no bias."""
    soft = vitlab.create_model(V2_T, **SMALL, mixer="softmax")
    attn = soft.layers[0].blocks[0].attn
    assert attn.core.name == "softmax" and not hasattr(attn, "logit_scale") and hasattr(attn, "cpb_mlp")
    lin = vitlab.create_model(V2_T, **SMALL, attn_type="LS", mixer_kwargs=dict(focusing_factor=3.0))
    a0, a1 = lin.layers[0].blocks[0].attn, lin.layers[1].blocks[0].attn
    assert a0.core.name == "focused_linear" and not a0.positions and a1.core.name == "cosine"
    fixed = vitlab.create_model(V2_T, **SMALL, mixer_kwargs=dict(learn_logit_scale=False, tau=12.0))
    assert not hasattr(fixed.layers[0].blocks[0].attn, "logit_scale")
    pre = vitlab.create_model(V2_T, **SMALL, wiring="pre", cpb=False)
    blk = pre.layers[0].blocks[0]
    assert not blk.attn.positions and float(blk.norm1.weight.detach().abs().min()) > 0  # norms zeroed only for res_post


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="pretrained_window_sizes needs one value per stage"):
        vitlab.create_model(V2_T, **SMALL, pretrained_window_sizes=(8, 8, 8))
    with pytest.raises(ValueError, match="pretrained_window_size must be 0"):
        vitlab.create_model(V2_T, **SMALL, pretrained_window_sizes=-1)
    with pytest.raises(ValueError, match="cpb_dim must be a positive int"):
        vitlab.create_model(V2_T, **SMALL, mixer_kwargs=dict(cpb_dim=0))
    with pytest.raises(ValueError, match="wiring must be one of"):
        vitlab.create_model(V2_T, **SMALL, wiring="respost")
    # a fine-tuned recipe's per-stage defaults follow fewer stages
    model = vitlab.create_model("swinv2_base_window12to16_192to256", **SMALL)
    assert isinstance(model, SwinTransformerV2)
    assert [s.blocks[0].attn.positions[0].pretrained for s in model.layers] == [(12, 12), (12, 12)]
