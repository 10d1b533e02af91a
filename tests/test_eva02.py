"""EVA-02 (``eva02_*``, "EVA-02: A Visual Representation for Neon Genesis", Fang et al., 2023): exact parameter
counts, keys and data configs vs timm at the default sizes (meta), timm parity both ways with every parameter
randomised for the two block styles (Ti/S: packed SwiGLU + fused q/v-biased qkv; B/L: sub-LN SwiGLU + separate
q/k/v), the new parts against explicit computations (the sub-LN SwiGLU, the ``norm`` option of both GLU mixers,
projection ``separate_qv_bias``), timm's init statistics and optimizer groups, and the GLU options in the other
families whose channel mixer is chosen by name (PiT, LeViT; Swin's MLP is fixed)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.interop import to_timm_state_dict
from vitlab.layers import NORMS, MultiHeadAttention, TokenLayout
from vitlab.layers.glu import SwiGLU, SwiGLUPacked
from vitlab.layers.mlp import CHANNEL_MIXERS
from parity import check_parity, on_meta, randomize_

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["eva02_tiny_patch14_224", "eva02_small_patch14_224", "eva02_base_patch14_224", "eva02_large_patch14_224",
         "eva02_tiny_patch14_336", "eva02_small_patch14_336", "eva02_base_patch14_448", "eva02_large_patch14_448"]
CLIP = {"eva02_base_patch16_clip_224", "eva02_large_patch14_clip_224", "eva02_large_patch14_clip_336",
        "eva02_enormous_patch14_clip_224"}  # EVA-CLIP towers: attention sub-LN / post-norm blocks, not registered
EVA = dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=(16, 16))


def test_every_timm_eva02_name_is_registered_or_a_clip_tower():
    assert set(timm.list_models("eva02*")) == set(NAMES) | CLIP
    assert set(vitlab.list_models("eva02*")) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_default_size_counts_keys_and_data_config_equal_timm(name):
    ours, ref = on_meta(vitlab.create_model, name), on_meta(timm.create_model, name)
    assert type(ours).__name__ == "Eva" and ours.num_classes == ref.num_classes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want  # timm's keys, no rename
    assert to_timm_state_dict(ours).keys() == want.keys()
    cfg, ref_cfg = ours.default_cfg, ref.pretrained_cfg
    for key in ("input_size", "num_classes", "crop_pct", "interpolation"):
        assert cfg[key] == ref_cfg[key], key
    for key in ("mean", "std"):
        assert cfg[key] == pytest.approx(ref_cfg[key]), key
    assert cfg.get("crop_mode", "center") == ref_cfg["crop_mode"]


def test_block_parts_follow_the_size():
    """Ti/S: packed SwiGLU of 2 x int(8/3 dim), fused qkv with q/v biases; B/L: fc1_g/fc1_x + LayerNorm, q/k/v."""
    tiny, large = (on_meta(vitlab.create_model, n).blocks[0] for n in (NAMES[0], NAMES[3]))
    assert isinstance(tiny.mlp, SwiGLUPacked) and isinstance(tiny.mlp.norm, torch.nn.Identity)
    assert (tiny.mlp.fc1.out_features, tiny.mlp.fc2.in_features) == (2 * int(192 * 8 / 3), int(192 * 8 / 3))
    assert {n for n, _ in tiny.attn.named_parameters()} == {"qkv.weight", "q_bias", "v_bias", "proj.weight",
                                                             "proj.bias"}
    assert isinstance(large.mlp, SwiGLU) and isinstance(large.mlp.norm, torch.nn.LayerNorm)
    assert large.mlp.fc2.in_features == int(1024 * 8 / 3) == large.mlp.norm.normalized_shape[0]
    assert large.mlp.norm.eps == 1e-6 and not any("gamma" in n for n, _ in large.named_parameters())  # no LayerScale
    assert large.attn.k_proj.bias is None and large.attn.q_proj.bias is not None


@pytest.mark.parametrize("name, kw", [
    ("eva02_tiny_patch14_224", dict(img_size=28, embed_dim=48, num_heads=2, num_classes=5)),  # 2x2 grid: scale 8
    ("eva02_small_patch14_336", dict(img_size=42, embed_dim=32, num_heads=2)),  # 3x3 grid: scale 16/3, 1000 classes
    ("eva02_large_patch14_448", dict(img_size=42, embed_dim=32, num_heads=2, num_classes=7)),  # sub-LN, q/k/v
    ("eva02_base_patch14_224", dict(img_size=28, embed_dim=48, num_heads=3, num_classes=5, dynamic_img_size=True)),
])
def test_parity_with_timm_every_parameter_randomised(name, kw):
    """Logits and block maps equal to timm's both ways (2 blocks); the dynamic one on a 3x2 grid (42x28 input)."""
    x = torch.randn(2, 3, 42, 28, generator=torch.Generator().manual_seed(3)) if kw.get("dynamic_img_size") else None
    check_parity(name, depth=2, x=x, **kw)


def _layer_norm(h, weight, bias, eps=1e-6):
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).square().mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * weight + bias


def test_sub_ln_swiglu_equals_the_formula():
    """EVA-02's FFN: ``W2 LN(Swish(x W) * x V)`` (Shazeer 2020 with the sub-LN), every tensor random."""
    mlp = randomize_(CHANNEL_MIXERS.get("swiglu_norm")(12, 20))
    assert {n for n, _ in mlp.named_parameters()} == {f"{m}.{p}" for m in ("fc1_g", "fc1_x", "norm", "fc2")
                                                       for p in ("weight", "bias")}
    x = torch.randn(2, 5, 12)
    gate = torch.einsum("bnc,hc->bnh", x, mlp.fc1_g.weight) + mlp.fc1_g.bias
    value = torch.einsum("bnc,hc->bnh", x, mlp.fc1_x.weight) + mlp.fc1_x.bias
    hidden = _layer_norm(gate * torch.sigmoid(gate) * value, mlp.norm.weight, mlp.norm.bias)
    want = torch.einsum("bnh,ch->bnc", hidden, mlp.fc2.weight) + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), want)
    plain = CHANNEL_MIXERS.get("swiglu")(12, 20)  # the same without the norm: no norm keys, another function
    plain.load_state_dict({k: v for k, v in mlp.state_dict().items() if not k.startswith("norm.")})
    assert isinstance(plain.norm, torch.nn.Identity) and (plain(x) - want).abs().max() > 1e-2


@pytest.mark.parametrize("norm", ["rms", "center"])
def test_norm_option_of_both_glu_mixers(norm):
    """``norm=`` names any vitlab norm for the gated hidden, in the packed and the separate layout alike."""
    x = torch.randn(2, 5, 12)
    packed, split = SwiGLUPacked(12, 20, norm=norm), SwiGLU(12, 10, norm=norm)
    randomize_(packed)
    split.load_state_dict({"fc1_g.weight": packed.fc1.weight[:10], "fc1_g.bias": packed.fc1.bias[:10],
                           "fc1_x.weight": packed.fc1.weight[10:], "fc1_x.bias": packed.fc1.bias[10:],
                           **{k: v for k, v in packed.state_dict().items() if k.split(".")[0] in ("norm", "fc2")}})
    gate, value = F.linear(x, packed.fc1.weight, packed.fc1.bias).chunk(2, -1)
    hidden = F.silu(gate) * value
    want = F.linear(packed.norm(hidden), packed.fc2.weight, packed.fc2.bias)
    torch.testing.assert_close(packed(x), want)
    torch.testing.assert_close(split(x), want)
    assert isinstance(packed.norm, NORMS.get(norm)) and isinstance(split.norm, NORMS.get(norm))
    with pytest.raises(ValueError, match="unknown norm 'rsm'"):
        SwiGLU(12, 10, norm="rsm")


def test_separate_qv_bias_projection_equals_the_fused_one():
    """q_proj / k_proj (no bias) / v_proj hold the rows of linear_qv_bias's qkv: the same attention, with RoPE."""
    layout = TokenLayout((2, 3), 1)
    sep = randomize_(MultiHeadAttention(16, 2, projection="separate_qv_bias", position=(("rope", EVA),),
                                        layout=layout))
    assert {n for n, _ in sep.named_parameters()} == {"q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                       "v_proj.weight", "v_proj.bias", "proj.weight", "proj.bias"}
    fused = MultiHeadAttention(16, 2, projection="linear_qv_bias", position=(("rope", EVA),), layout=layout)
    sd = sep.state_dict()
    fused.load_state_dict({"qkv.weight": torch.cat([sd[f"{t}_proj.weight"] for t in "qkv"]),
                           "q_bias": sd["q_proj.bias"], "v_bias": sd["v_proj.bias"],
                           "proj.weight": sd["proj.weight"], "proj.bias": sd["proj.bias"]})
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(sep(x), fused(x))
    plain = MultiHeadAttention(16, 2, projection="separate_qv_bias", qkv_bias=False, layout=layout)
    assert {n for n, _ in plain.named_parameters()} == {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                         "proj.weight", "proj.bias"}


@pytest.mark.parametrize("family", ["pit", "levit"])  # the other families whose channel mixer is chosen by name
@pytest.mark.parametrize("mlp", ["swiglu", "swiglu_norm"])
def test_glu_mixers_in_other_families(family, mlp):
    """Every block's MLP becomes the SwiGLU (with the sub-LN for swiglu_norm) and every parameter trains."""
    from vitlab.models.parts_table import FAMILY_EXAMPLES

    name, small, shape = FAMILY_EXAMPLES[family]
    m = vitlab.create_model(name, **small, mlp=mlp)
    glus = [mod for mod in m.modules() if isinstance(mod, SwiGLU)]
    mixer_types = tuple(c for c in map(CHANNEL_MIXERS.get, CHANNEL_MIXERS.names()) if isinstance(c, type))
    default = [mod for mod in vitlab.create_model(name, **small).modules() if isinstance(mod, mixer_types)]
    assert len(glus) == len(default) > 0
    assert all(isinstance(g.norm, torch.nn.LayerNorm) == (mlp == "swiglu_norm") for g in glus)
    out = m(torch.randn(2, *shape))
    (sum(out) if isinstance(out, tuple) else out).square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]


def test_model_contract_on_a_small_eva02():
    m = vitlab.create_model("eva02_base_patch14_448", img_size=28, depth=2, embed_dim=32, num_heads=2,
                            num_classes=5)
    x = torch.randn(2, 3, 28, 28)
    m(x).square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]
    final, feats = m.forward_intermediates(x, indices=[0, 1])
    assert final.shape == (2, 1 + 4, 32) and [f.shape for f in feats] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(m.forward_head(m.forward_features(x)), m(x))
    assert {"cls_token", "pos_embed"} <= set(m.no_weight_decay())
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)


def _lr_scale_and_decay(model):
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_layer_decay_and_init_statistics_equal_timm():
    """timm's optimizer groups with layer decay are the same; from scratch both start as timm's ``Eva``: per block
    ``l`` std(attn.proj) / std(q_proj) and std(mlp.fc2) / std(mlp.fc1_g) are ``1 / sqrt(2 l)``, the class token
    has std 0.02."""
    kw = dict(depth=3, embed_dim=192, num_heads=3, num_classes=10)
    torch.manual_seed(0)
    ours, ref = vitlab.create_model(NAMES[2], **kw), timm.create_model(NAMES[2], **kw)
    got, want = _lr_scale_and_decay(ours), _lr_scale_and_decay(ref)
    assert got == want and want["cls_token"][1] == 0.0 and len({s for s, _ in want.values()}) > 3
    for model in (ours, ref):
        for depth, block in enumerate(model.blocks, start=1):
            ratios = (block.attn.proj.weight.std() / block.attn.q_proj.weight.std(),
                      block.mlp.fc2.weight.std() / block.mlp.fc1_g.weight.std())
            assert [r.item() for r in ratios] == pytest.approx([1 / math.sqrt(2 * depth)] * 2, rel=0.03)
        assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)  # 192 draws
