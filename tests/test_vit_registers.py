"""timm's register-token ViTs (``vit_*_reg*``, "Vision Transformers Need Registers", Darcet et al., ICLR 2024):
exact parameter counts and keys vs timm at the default size (meta), data configs vs timm's, timm parity with every
parameter randomised at a reduced size, and the two parts they added checked against explicit computations:
the packed SwiGLU channel mixer and the MAP (attention pooling) head."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers.mlp import CHANNEL_MIXERS
from parity import check_parity, on_meta

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NEW = [
    "vit_large_patch14_reg4_dinov2", "vit_giant_patch14_reg4_dinov2",
    "vit_base_patch14_reg1_tipsv2", "vit_large_patch14_reg1_tipsv2", "vit_so400m_patch14_reg1_tipsv2",
    "vit_giant_patch14_reg1_tipsv2",
    "vit_wee_patch16_reg1_gap_256", "vit_little_patch16_reg1_gap_256", "vit_little_patch16_reg4_gap_256",
    "vit_medium_patch16_reg1_gap_256", "vit_medium_patch16_reg4_gap_256", "vit_mediumd_patch16_reg4_gap_256",
    "vit_mediumd_patch16_reg4_gap_384", "vit_betwixt_patch16_reg1_gap_256", "vit_betwixt_patch16_reg4_gap_256",
    "vit_betwixt_patch16_reg4_gap_384", "vit_so150m_patch16_reg4_gap_256", "vit_so150m_patch16_reg4_gap_384",
    "vit_so150m_patch16_reg4_map_256", "vit_so150m2_patch16_reg1_gap_256", "vit_so150m2_patch16_reg1_gap_384",
    "vit_so150m2_patch16_reg1_gap_448",
]
BEFORE = ["vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2", "vit_base_patch16_reg4_gap_256"]
# timm names not registered, and why (see vitlab.models.vit_registers)
NOT_EXPRESSIBLE: dict = {}
# differential attention and ViT-22B's parallel block: counts, keys (the parallel ones through
# vitlab.interop.timm_vit), data configs and parity in tests/test_vit_diff_parallel.py
DIFF_PARALLEL = ["vit_dwee_patch16_reg1_gap_256", "vit_dlittle_patch16_reg1_gap_256", "vit_pwee_patch16_reg1_gap_256",
                 "vit_dpwee_patch16_reg1_gap_256"]
# timm's Eva class: counts, keys (through vitlab.interop.timm_eva), data configs and parity in tests/test_vit_rope_eva.py
ROPE_EVA = ["vit_medium_patch16_rope_reg1_gap_256", "vit_mediumd_patch16_rope_reg1_gap_256",
            "vit_betwixt_patch16_rope_reg4_gap_256", "vit_base_patch16_rope_reg1_gap_256"]


def test_every_timm_register_name_is_registered_or_listed_as_not_expressible():
    timm_names = set(timm.list_models("vit_*reg*"))
    assert timm_names == set(NEW) | set(BEFORE) | set(NOT_EXPRESSIBLE) | set(ROPE_EVA) | set(DIFF_PARALLEL)
    assert all(vitlab.is_model(n) for n in NEW + BEFORE + ROPE_EVA + DIFF_PARALLEL)
    assert not any(vitlab.is_model(n) for n in NOT_EXPRESSIBLE)


@pytest.mark.parametrize("name", NEW)
def test_default_size_counts_keys_and_shapes_equal_timm(name):
    ours, ref = on_meta(vitlab.create_model, name), on_meta(timm.create_model, name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want


@pytest.mark.parametrize("name", NEW + BEFORE)
def test_data_config_equals_timms(name):
    ours, ref = on_meta(vitlab.create_model, name).default_cfg, on_meta(timm.create_model, name).pretrained_cfg
    for key in ("input_size", "num_classes", "crop_pct", "interpolation"):
        assert ours[key] == ref[key], (key, ours[key], ref[key])
    for key in ("mean", "std"):
        assert ours[key] == pytest.approx(ref[key]), key
    assert ours.get("crop_mode", "center") == ref["crop_mode"]


# one of each kind: class token + 1 register + LayerScale 1.0 (TIPSv2), a non-integer MLP ratio, SwiGLU (DINOv2-g),
# gap with LayerScale, table over the registers without LayerScale and norm before the pool, MAP head, no qkv bias
@pytest.mark.parametrize("name, kw", [
    ("vit_base_patch14_reg1_tipsv2", dict(img_size=28, embed_dim=64, num_heads=2)),
    ("vit_so400m_patch14_reg1_tipsv2", dict(img_size=28, embed_dim=64, num_heads=4)),
    ("vit_giant_patch14_reg4_dinov2", dict(img_size=28, embed_dim=96, num_heads=2)),
    ("vit_little_patch16_reg4_gap_256", dict(img_size=32, embed_dim=80, num_heads=5)),
    ("vit_so150m_patch16_reg4_gap_384", dict(img_size=32, embed_dim=64, num_heads=2)),
    ("vit_so150m_patch16_reg4_map_256", dict(img_size=32, embed_dim=64, num_heads=2)),
    ("vit_so150m2_patch16_reg1_gap_448", dict(img_size=48, embed_dim=52, num_heads=2)),
])
def test_parity_with_timm_every_parameter_randomised(name, kw):
    """Logits and block maps equal to timm's both ways (2 blocks, the size's other choices kept)."""
    check_parity(name, depth=2, **kw)


def test_swiglu_packed_is_silu_of_the_first_half_times_the_second():
    torch.manual_seed(0)
    mlp = CHANNEL_MIXERS.get("swiglu_packed")(12, 20)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 5, 12)
    w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    gate = torch.einsum("bnc,hc->bnh", x, w1[:10]) + b1[:10]  # Shazeer (2020): Swish(xW) * xV, then W2
    value = torch.einsum("bnc,hc->bnh", x, w1[10:]) + b1[10:]
    want = torch.einsum("bnh,ch->bnc", gate * torch.sigmoid(gate) * value, w2) + b2
    torch.testing.assert_close(mlp(x), want)
    assert mlp.fc2.in_features == 10
    with pytest.raises(ValueError, match="even hidden width.*21"):
        CHANNEL_MIXERS.get("swiglu_packed")(12, 21)


def test_giant_mlp_widths_follow_dinov2():
    """DINOv2's SwiGLU hidden for ViT-g: (int(4 * 1536 * 2 / 3) + 7) // 8 * 8 = 4096 per half."""
    blk = on_meta(vitlab.create_model, "vit_giant_patch14_reg4_dinov2").blocks[0]
    assert (blk.mlp.fc1.out_features, blk.mlp.fc2.in_features) == (2 * 4096, (int(4 * 1536 * 2 / 3) + 7) // 8 * 8)


def _map_by_hand(m, tokens):
    """The MAP head written out: one latent query per image over the patch tokens (prefix dropped), per head."""
    pool, h = m.attn_pool, m.blocks[0].attn.num_heads
    x = tokens[:, m.num_prefix_tokens:]
    b, n, c = x.shape
    q = F.linear(pool.latent, pool.q.weight, pool.q.bias).reshape(1, h, c // h)
    k, v = F.linear(x, pool.kv.weight, pool.kv.bias).reshape(b, n, 2, h, c // h).unbind(2)
    a = torch.einsum("hd,bnhd->bhn", q[0], k).div(math.sqrt(c // h)).softmax(-1)
    y = F.linear(torch.einsum("bhn,bnhd->bhd", a, v).reshape(b, c), pool.proj.weight, pool.proj.bias)
    y = y + pool.mlp.fc2(F.gelu(pool.mlp.fc1(F.layer_norm(y, (c,), pool.norm.weight, pool.norm.bias, 1e-6))))
    return m.head(y)


def test_map_head_equals_attention_pooling_written_out():
    m = vitlab.create_model("vit_so150m_patch16_reg4_map_256", img_size=32, depth=1, embed_dim=32, num_heads=2,
                            num_classes=7).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(3, 3, 32, 32)
        feats = m.forward_features(x)
        torch.testing.assert_close(m(x), _map_by_hand(m, feats))
        # the registers are not read: changing them after the blocks leaves the logits alone
        feats[:, :4] += 5.0
        torch.testing.assert_close(m.forward_head(feats), _map_by_hand(m, feats))


def test_map_head_switching_and_errors():
    m = vitlab.create_model("vit_so150m_patch16_reg4_map_256", img_size=32, depth=1, embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    m.reset_classifier(5, global_pool="avg")
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 4:].mean(1))
    m.reset_classifier(5, global_pool="map")
    assert m(x).shape == (2, 5)
    gap = vitlab.create_model("vit_wee_patch16_reg1_gap_256", img_size=32, depth=1)
    with pytest.raises(ValueError, match="global_pool='map' needs the attention-pooling head"):
        gap.reset_classifier(5, global_pool="map")
    with pytest.raises(ValueError, match="'map'.*got 'mapp'"):
        vitlab.create_model("vit_wee_patch16_reg1_gap_256", img_size=32, depth=1, global_pool="mapp")


@pytest.mark.parametrize("family", ["vit", "pit", "levit"])  # the families whose channel mixer is chosen by name
def test_swiglu_packed_in_every_family_that_takes_a_channel_mixer(family):
    """Every block's MLP becomes the packed SwiGLU (fc2 reads half of fc1's width) and every parameter trains."""
    from vitlab.layers.glu import SwiGLUPacked
    from vitlab.models.parts_table import FAMILY_EXAMPLES

    name, small, shape = FAMILY_EXAMPLES[family]
    m = vitlab.create_model(name, **small, mlp="swiglu_packed")
    mlps = [mod for mod in m.modules() if isinstance(mod, SwiGLUPacked)]
    mixer_types = tuple(c for c in map(CHANNEL_MIXERS.get, CHANNEL_MIXERS.names()) if isinstance(c, type))
    default = [mod for mod in vitlab.create_model(name, **small).modules() if isinstance(mod, mixer_types)]
    assert len(mlps) == len(default) > 0 and all(g.fc2.in_features * 2 == g.fc1.out_features for g in mlps)
    out = m(torch.randn(2, *shape))
    (sum(out) if isinstance(out, tuple) else out).square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]


def test_register_tokens_get_no_weight_decay_as_in_timm():
    """timm's optimizer groups (param_groups_weight_decay with the model's no_weight_decay) are the same: the register
    tokens, the position table and every 1-D tensor without decay."""
    from timm.optim._param_groups import param_groups_weight_decay

    def no_decay(model):
        groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
        ids = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    name = "vit_small_patch14_reg4_dinov2"
    ours = vitlab.create_model(name, depth=1, img_size=28)
    ref = timm.create_model(name, depth=1, img_size=28)
    assert "reg_token" in no_decay(ours) and no_decay(ours) == no_decay(ref)
