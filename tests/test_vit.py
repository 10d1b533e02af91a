"""The isotropic ViT family, the registry and timm interop (issue 2), each against timm or a
closed form."""
import itertools

import pytest
import timm
import torch

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.interop.timm import TimmKeyError
from vitlab.layers.mixers import MIXERS
from vitlab.layers.norm import NORMS
from vitlab.layers.shortcut import SHORTCUTS
from vitlab.layers.recording import record_attention
from parity import check_parity, randomize_

# every ViT/DeiT name vitlab registers that timm also has
TIMM_SHARED = [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
    "vit_base_patch32_224", "vit_small_patch32_224", "vit_base_patch16_384",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def test_shared_names_are_registered_in_both():
    for name in TIMM_SHARED:
        assert vitlab.is_model(name), name
        assert name in timm.list_models(name), name


def _timm_pair(name, **kw):
    torch.manual_seed(0)
    tm = timm.create_model(name, pretrained=False, **kw).eval()
    vm = vitlab.create_model(name, **kw).eval()
    return tm, vm


@pytest.mark.parametrize("name", TIMM_SHARED)
def test_timm_parity_both_directions(name):
    kw = {}
    if "large" in name or "base" in name:
        kw = dict(depth=2)  # same widths and keys; 2 of the 12/24 identical blocks keep CI fast
    # every parameter randomised (biases, norms, tokens), logits and block maps, both directions
    check_parity(name, **kw)


def test_param_counts_match_timm_for_full_size_models():
    # parity above trims ViT-L's depth; the full-size counts are checked here on the meta device
    for name in ("vit_large_patch16_224", "vit_base_patch16_384"):
        with torch.device("meta"):
            n_t = sum(p.numel() for p in timm.create_model(name).parameters())
            n_v = sum(p.numel() for p in vitlab.create_model(name).parameters())
        assert n_v == n_t, name


def test_load_timm_weights_is_strict_and_names_the_keys():
    tm, vm = _timm_pair("vit_tiny_patch16_224", depth=1)
    sd = dict(tm.state_dict())
    sd["blocks.0.attn.extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    with pytest.raises(TimmKeyError) as err:
        load_timm_weights(vm, sd)
    assert "blocks.0.attn.extra.weight" in str(err.value) and "head.bias" in str(err.value)
    sd = dict(tm.state_dict())
    sd["head.weight"] = torch.zeros(7, 192)
    with pytest.raises((ValueError, RuntimeError), match="head.weight"):
        load_timm_weights(vm, sd)


def test_384_model_loads_224_weights_like_timm():
    """A 224 checkpoint loads into the 384 model with the position table interpolated the way
    timm's checkpoint_filter_fn does it, so both give the same logits."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    torch.manual_seed(0)
    small = dict(depth=2)
    t224 = randomize_(timm.create_model("vit_tiny_patch16_224", **small))
    t384 = timm.create_model("vit_tiny_patch16_224", img_size=384, **small).eval()
    t384.load_state_dict(checkpoint_filter_fn(t224.state_dict(), t384))
    v384 = vitlab.create_model("vit_tiny_patch16_224", img_size=384, **small).eval()
    assert v384.pos_embed.shape == (1, 1 + 24 * 24, 192)
    assert v384.default_cfg["input_size"] == (3, 384, 384)
    v384.load_state_dict(t224.state_dict())
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert (v384(x) - t384(x)).abs().max().item() < 1e-4


def test_unknown_names_list_the_closest():
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        vitlab.create_model("vit_smal_patch16_224")
    with pytest.raises(ValueError, match="cosine"):
        vitlab.create_model("vit_tiny_patch4_32", mixer="cosin")
    with pytest.raises(ValueError, match="center"):
        vitlab.create_model("vit_tiny_patch4_32", norm="centre")
    with pytest.raises(ValueError, match="weighted"):
        vitlab.create_model("vit_tiny_patch4_32", shortcut="weigthed")
    with pytest.raises(ValueError, match="spectral"):
        vitlab.create_model("vit_tiny_patch4_32", init="spectrl")


def test_bad_inputs_name_the_value():
    m = vitlab.create_model("vit_tiny_patch4_32", **{k: v for k, v in TINY.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="48"):
        m(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="patch"):
        vitlab.create_model("vit_tiny_patch4_32", img_size=30)  # 30 is not a multiple of 4


def test_list_models_pattern():
    names = vitlab.list_models("deit_*")
    assert names == sorted(names)
    assert {"deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"} <= set(names)
    assert all(n.startswith("deit_") for n in names)


def test_forward_intermediates_contract():
    m = vitlab.create_model("vit_tiny_patch4_32", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = m.forward_halves(x)
        feats = m.forward_features(x)
    assert len(inter) == 2 * TINY["depth"] + 1
    assert [i.kind for i in inter] == ["embed"] + ["attn", "mlp"] * TINY["depth"]
    for i in inter:
        assert i.feature.shape == (2, 32, 4, 4) and i.spatial_shape == (4, 4)
        assert i.prefix.shape == (2, 1, 32)
    # the last block's output, normed, is forward_features
    torch.testing.assert_close(m.norm(inter[-1].all_tokens), feats)


def test_no_weight_decay_names():
    m = vitlab.create_model("vit_tiny_patch4_32", **TINY)
    nwd = m.no_weight_decay()
    assert {"pos_embed", "cls_token", "head.bias", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"} <= nwd
    assert not {"head.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight"} & nwd


def test_default_cfg_small_image_configs():
    m = vitlab.create_model("vit_tiny_patch4_28")
    assert m.default_cfg["input_size"] == (1, 28, 28) and m.default_cfg["num_classes"] == 10
    assert len(m.default_cfg["mean"]) == 1
    out = m(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


COMBOS = list(itertools.product(MIXERS.names(), NORMS.names(), SHORTCUTS.names(), [False, True]))


@pytest.mark.parametrize("mixer,norm,shortcut,featscale", COMBOS)
def test_every_part_combination_trains(mixer, norm, shortcut, featscale):
    torch.manual_seed(0)
    m = vitlab.create_model("vit_tiny_patch4_32", mixer=mixer, norm=norm, shortcut=shortcut,
                            featscale=featscale, **TINY)
    x = torch.randn(4, 3, 32, 32)
    out = m(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    # gradient reaches the first block's mixer (the part is really in the path)
    mixer_grads = [p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.startswith("blocks.0.attn")]
    assert any(mixer_grads) or not list(m.blocks[0].attn.parameters())  # pooling has no parameters


@pytest.mark.parametrize("init", ["trunc_normal", "xavier", "spectral"])
@pytest.mark.parametrize("mixer", MIXERS.names())
def test_every_init_with_every_mixer(init, mixer):
    m = vitlab.create_model("vit_tiny_patch4_32", mixer=mixer, init=init, **TINY)
    out = m(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    if init == "spectral":
        w = m.blocks[0].mlp.fc1.weight.detach()
        assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-4


def test_attnscale_and_featscale_at_zero_equal_the_baseline():
    """AttnScale's omega and FeatScale's s, t start at zero (identity); with a baseline's
    weights loaded the models give the baseline's logits, and moving the scales changes them."""
    torch.manual_seed(0)
    base = vitlab.create_model("vit_tiny_patch4_32", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = base(x)
    for kw, extra in ((dict(mixer="attnscale"), "omega"), (dict(featscale=True), "featscale")):
        m = vitlab.create_model("vit_tiny_patch4_32", **kw, **TINY).eval()
        missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
        assert missing and all(extra in k for k in missing) and not unexpected
        with torch.no_grad():
            torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
            for k in missing:
                m.get_parameter(k).fill_(5.0)
            assert (m(x) - want).abs().max() > 1e-3


def test_recording_attention_on_the_vit():
    m = vitlab.create_model("vit_tiny_patch4_32", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = m(x)
        with record_attention(m) as rec:
            recorded = m(x)
    probs = rec.last()
    assert len(probs) == TINY["depth"]
    for p in probs.values():
        assert p.shape == (2, 2, 17, 17)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,params", [
    ("deit_small_patch16_224", 22_050_664),      # DeiT-S (Touvron et al.) = timm
    ("attnscale_small_12", 22_050_736),          # anti-oversmoothing spec: +72 AttnScale weights
    ("featscale_small_12", 22_059_880),          # + 2 x 384 FeatScale weights x 12 blocks
    ("attnscale_small_24", 43_344_376),
    ("featscale_small_24", 43_362_664),
    # parallel ViT-S/B 18x2 (Touvron et al., ECCV 2022; timm's counts): 2 x (attention + MLP) per block
    ("vit_small_patch16_18x2_224", 64_665_448),
    ("vit_base_patch16_18x2_224", 256_731_880),
])
def test_paper_recipe_param_counts(name, params):
    with torch.device("meta"):
        m = vitlab.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == params


def test_lipsformer_recipe_uses_its_parts():
    from vitlab.layers import CenterNorm, CosineAttention
    m = vitlab.create_model("lipsformer_vit_small", depth=2)
    assert isinstance(m.blocks[0].norm1, CenterNorm) and m.blocks[0].attn.core.name == "cosine"
    assert m.blocks[0].ls1.gamma.detach().allclose(torch.full((384,), 1 / 2))  # weighted shortcut 1/depth
    w = m.blocks[0].attn.qkv.weight.detach()
    assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-4  # spectral init


@pytest.mark.parametrize("name, kw", [
    ("deit3_small_patch16_224", dict(img_size=32, depth=2)),
    ("deit3_base_patch16_384", dict(img_size=32, depth=1)),
    ("deit3_huge_patch14_224", dict(img_size=28, depth=1)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2)),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=32, depth=2)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2, dynamic_img_size=True)),
    ("vit_small_patch16_18x2_224", dict(img_size=32, depth=2)),
    ("vit_base_patch16_18x2_224", dict(img_size=32, depth=1)),
])
def test_deit3_register_and_parallel_models_match_timm(name, kw):
    """DeiT III (LayerScale, position table on the patches only), register tokens and parallel blocks
    (2 attention + 2 MLP branches per block): every parameter randomised, logits and block maps equal to
    timm's both ways."""
    check_parity(name, **kw)


def test_register_tokens_are_prefix_tokens_outside_the_position_table():
    m = vitlab.create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=1).eval()
    assert m.num_prefix_tokens == 5 and m.pos_embed.shape == (1, 4, 384) and m.reg_token.shape == (1, 4, 384)
    tokens, layout = m.forward_stem(torch.randn(2, 3, 28, 28))
    assert layout.num_prefix == 5 and tokens.shape == (2, 9, 384)
    # the registers and the class token carry no position: equal to the parameters themselves
    torch.testing.assert_close(tokens[:, 1:5], m.reg_token.expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 0], m.cls_token[:, 0].expand(2, -1))
    assert m.forward_intermediates(torch.randn(1, 3, 28, 28), indices=1, intermediates_only=True)[0].shape == \
        (1, 384, 2, 2)  # prefix tokens (class + 4 registers) dropped from the maps
