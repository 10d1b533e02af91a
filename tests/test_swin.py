"""Swin backbone ("Swin Transformer", Liu et al., ICCV 2021) and its LipsFormer / FLatten recipes.

Checked against timm (parameter counts, logits in both directions, 384 checkpoint filtering,
shifted-window masks) and against the spec tables (shared/specs/lipsformer.md, flatten.md).
Big models are built with a no-op initialiser (the counts do not depend on the values).
"""
import contextlib
import math
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.layers import CenterNorm, CosineAttention, FocusedLinearAttention, record_attention
from vitlab.layers.window import resize_relative_position_table
from vitlab.models.cli import count_macs, count_params
from vitlab.models.swin import SwinTransformer
from parity import check_parity, randomize_, swin_official_layout

SWIN_T = "swin_tiny_patch4_window7_224"
# a small Swin: 64x64 input -> maps 16, 8, 4, 2; window 4 (stage 3 and 4 windows shrink to the map)
SMALL = dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 1), num_heads=(2, 2, 4, 4), window_size=4,
             num_classes=7, drop_path_rate=0.0)


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


# -- sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [SWIN_T, "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
                                  "swin_base_patch4_window12_384"])
def test_param_count_equals_timm(name):
    with torch.device("meta"):
        ours = vitlab.create_model(name)
        ref = timm.create_model(name, pretrained=False)
    assert count_params(ours) == count_params(ref)
    assert set(to_timm_state_dict(ours)) == set(ref.state_dict())


def group_grid(blk):
    """The grid each attention group covers (a window, or the whole map)."""
    return tuple(blk.attn.grouping.key_grid(blk.attn.layout)[0])


def test_macs_equal_timm_swin_tiny():
    with cheap_init():
        ours = vitlab.create_model(SWIN_T, init="trunc_normal")
        ref = timm.create_model(SWIN_T, pretrained=False)
    ref.default_cfg = {"input_size": (3, 224, 224)}
    assert count_macs(ours) == count_macs(ref)


# spec tables: lipsformer.md (reference numbers), flatten.md section 8 -- (M params, GMACs)
SPEC = {
    "lipsformer_swin_tiny": (30.91, 4.98, {}),
    "lipsformer_swin_small": (54.48, 9.66, {}),
    "lipsformer_swin_base": (96.01, 16.97, {}),
    "flatten_swin_tiny": (29.19, 4.50, {}),
    "flatten_swin_small": (50.51, 8.76, {}),
    "flatten_swin_base": (88.97, 15.46, {}),
    "flatten_swin_base@384": (91.43, 46.49, {"img_size": 384}),
}


@pytest.mark.parametrize("key", sorted(SPEC))
def test_params_and_macs_within_one_percent_of_spec(key):
    params, gmacs, kw = SPEC[key]
    with cheap_init():
        model = vitlab.create_model(key.split("@")[0], init="trunc_normal", **kw)
    assert count_params(model) / 1e6 == pytest.approx(params, rel=0.01)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.01)


# -- timm parity -------------------------------------------------------------------------------
def test_timm_parity_both_directions():
    # every parameter randomised (biases, norms, relative-position tables), logits and stage maps
    check_parity(SWIN_T)


def _small_timm(**kw):
    return timm.create_model(SWIN_T, pretrained=False, **{**SMALL, **kw}).eval()


def test_official_checkpoint_layout_loads():
    """The official Swin repo saves patch merging at the end of stage i and the head as ``head``."""
    ref = randomize_(_small_timm())
    official = swin_official_layout(ref.state_dict())
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(1)  # old checkpoints saved buffers
    ours = load_timm_weights(vitlab.create_model(SWIN_T, **SMALL), {"model": official}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


# -- resolution change ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolation helper warns about strides
def test_384_model_loads_224_checkpoint_as_timm_filter_does():
    from timm.models.swin_transformer import checkpoint_filter_fn

    src = randomize_(timm.create_model(SWIN_T, pretrained=False))  # tables too: a bad resize shows
    sd = src.state_dict()
    ref = timm.create_model(SWIN_T, pretrained=False, img_size=384, window_size=12).eval()
    filtered = checkpoint_filter_fn(sd, ref)
    ref.load_state_dict(filtered)
    ours = load_timm_weights(vitlab.create_model(SWIN_T, img_size=384, window_size=12), sd).eval()
    own = ours.state_dict()
    tables = [k for k in own if k.endswith("relative_position_bias_table")]
    assert own[tables[0]].shape == (23 * 23, 3)
    for k in tables:
        torch.testing.assert_close(own[k], filtered[k], rtol=0, atol=0)
    # the shifted-window masks were rebuilt for the 96/48/24/12 maps: equal to timm's
    for i, (a, b) in enumerate(zip(ours.layers, ref.layers)):
        for bo, bt in zip(a.blocks, b.blocks):
            if bt.attn_mask is None:
                assert bo.attn.attn_mask is None
            else:
                torch.testing.assert_close(bo.attn.attn_mask, bt.attn_mask.squeeze(1) if bt.attn_mask.ndim == 4
                                           else bt.attn_mask)
    assert ours.layers[3].blocks[1].attn.grouping.shift_size == (0, 0)  # 12x12 map == window: no shift
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4
    # vitlab -> vitlab: a 224 vitlab state dict loads into the 384 model the same way
    v224 = load_timm_weights(vitlab.create_model(SWIN_T), sd)
    again = vitlab.create_model(SWIN_T, img_size=384, window_size=12)
    again.load_state_dict(v224.state_dict())
    for k in tables:
        torch.testing.assert_close(again.state_dict()[k], filtered[k], rtol=0, atol=0)


def test_bicubic_table_resize_is_plain_bicubic():
    """``rel_pos_resize="bicubic"`` is the official Swin repo's F.interpolate(bicubic)."""
    table = torch.randn(13 * 13, 3)
    out = resize_relative_position_table(table, (12, 12), method="bicubic")
    ref = F.interpolate(table.T.reshape(1, 3, 13, 13), size=(23, 23), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, ref.reshape(3, -1).T)
    with pytest.raises(ValueError, match="resize method 'cubic'"):
        resize_relative_position_table(table, (12, 12), method="cubic")
    small = vitlab.create_model(SWIN_T, **SMALL)
    big = vitlab.create_model(SWIN_T, **{**SMALL, "img_size": 128, "window_size": 8}, rel_pos_resize="bicubic")
    big.load_state_dict(small.state_dict())
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    torch.testing.assert_close(big.state_dict()[key],
                               resize_relative_position_table(small.state_dict()[key], (8, 8), "bicubic"))


def test_window_not_dividing_the_map_pads_like_timm():
    check_parity(SWIN_T, atol=1e-5, **{**SMALL, "img_size": 80, "window_size": 3})  # maps 20, 10, 5, 2(.5)


# -- contract: intermediates, recording ---------------------------------------------------------
def test_forward_intermediates_per_block_maps():
    model = vitlab.create_model(SWIN_T, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inter = model.forward_halves(x)
        feats = model.forward_features(x)
    names = [i.name for i in inter]
    assert names[:4] == ["patch_embed", "layers.0.blocks.0.attn", "layers.0.blocks.0.mlp", "layers.0.blocks.1.attn"]
    assert len(inter) == 1 + 3 + 2 * sum(SMALL["depths"]) + 1  # + the final norm, what the head reads
    assert inter[-1].name == "norm" and inter[-1].kind == "norm"
    for it in inter:
        side = 16 // 2 ** it.stage
        assert it.feature.shape == (2, 16 * 2 ** it.stage, side, side), it.name
        assert it.spatial_shape == (side, side)
    assert [i.kind for i in inter if i.stage == 1][:2] == ["downsample", "attn"]
    # the last map, normalised, is exactly forward_features (tokens in raster order)
    torch.testing.assert_close(model.norm(inter[-2].tokens), feats)
    torch.testing.assert_close(inter[-1].tokens, feats)


def test_recorded_attention_is_per_window_and_masked():
    model = vitlab.create_model(SWIN_T, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        with record_attention(model) as rec:
            slow = model(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    maps = rec.last()
    assert len(maps) == sum(SMALL["depths"])
    # stage 0: 16x16 map, 4x4 windows -> 2 images * 16 windows, 16 tokens each (never 256x256)
    assert maps["layers.0.blocks.0.attn"].shape == (32, 2, 16, 16)
    assert maps["layers.2.blocks.1.attn"].shape == (2, 4, 16, 16)  # 4x4 map = one window
    assert maps["layers.3.blocks.0.attn"].shape == (2, 4, 4, 4)
    for p in maps.values():
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
        assert p.shape[-1] <= 16
    # shifted block: no attention across regions of the rolled map (mask -100)
    blk = model.layers[0].blocks[1]
    p = maps["layers.0.blocks.1.attn"].view(2, 16, 2, 16, 16)
    cross = blk.attn.attn_mask.view(1, 16, 1, 16, 16).expand_as(p) < -1
    assert cross.any() and p[cross].max() < 1e-30


# -- parts ---------------------------------------------------------------------------------------
OVERRIDES = [
    dict(mixer="cosine"), dict(mixer="attnscale"), dict(mixer="focused_linear"), dict(norm="center"),
    dict(norm="rms"), dict(shortcut="weighted"), dict(shortcut="layerscale"), dict(featscale=True),
    dict(init="spectral"), dict(init="xavier"), dict(attn_type="LLSS", mixer="cosine"),
]


@pytest.mark.parametrize("over", OVERRIDES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_part_overrides_forward_backward(over):
    model = vitlab.create_model(SWIN_T, **SMALL, **over)
    blk = model.layers[0].blocks[0]
    if over.get("mixer") == "focused_linear" or over.get("attn_type") == "LLSS":
        assert blk.attn.core.name == "focused_linear" and group_grid(blk) == (16, 16)
    if over.get("mixer") == "cosine":
        assert model.layers[3].blocks[0].attn.core.name == "cosine"
    if over.get("norm") == "center":
        assert isinstance(blk.norm1, CenterNorm) and isinstance(model.layers[1].downsample.norm, CenterNorm)
    if over.get("init") == "spectral":
        assert torch.linalg.matrix_norm(blk.attn.qkv.weight, ord=2).item() == pytest.approx(1.0, abs=1e-4)
    if over.get("shortcut") == "weighted":
        assert torch.allclose(blk.ls1.gamma, torch.full((16,), 1 / 7))
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    y.square().mean().backward()
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if over.get("featscale"):
        assert blk.featscale.s.grad.abs().sum() > 0


def test_bad_combinations_raise_clear_errors():
    with pytest.raises(ValueError, match="focused_linear.*linear cost"):
        vitlab.create_model(SWIN_T, **SMALL, mixer="focused_linear", attn_type="LLSS")
    with pytest.raises(ValueError, match="attn_type"):
        vitlab.create_model(SWIN_T, **SMALL, attn_type="LLS")
    with pytest.raises(ValueError, match="cosine"):
        vitlab.create_model(SWIN_T, **SMALL, mixer="cosin")
    with pytest.raises(ValueError, match=r"dim \(16\) must be divisible by num_heads \(3\)"):
        vitlab.create_model(SWIN_T, **{**SMALL, "num_heads": (3, 2, 4, 4)})
    with pytest.raises(ValueError, match="window_size needs one value per stage"):
        vitlab.create_model(SWIN_T, **{**SMALL, "window_size": (4, 4)})
    with pytest.raises(ValueError, match="rel_pos_resize"):
        vitlab.create_model(SWIN_T, **SMALL, rel_pos_resize="nearest")
    model = vitlab.create_model(SWIN_T, **SMALL)
    with pytest.raises(ValueError, match="img_size=96"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))


# -- recipes ---------------------------------------------------------------------------------------
def test_lipsformer_swin_recipe_follows_spec():
    model = vitlab.create_model("lipsformer_swin_tiny", **SMALL)
    blocks = [b for s in model.layers for b in s.blocks]
    assert all(b.attn.grouping.shift_size == (0, 0) and b.attn.attn_mask is None for b in blocks)  # never shifts
    assert all(b.post_norm and b.conv_units is not None for b in blocks)
    assert isinstance(model.norm, CenterNorm) and blocks[0].attn.core.name == "cosine"
    assert float(blocks[0].attn.tau) == 10.0
    total = sum(SMALL["depths"])
    for b in blocks:  # every branch starts at alpha = 1/L
        for g in (b.ls1.gamma, b.ls2.gamma, b.conv_units[0].alpha.gamma, b.conv_units[1].alpha.gamma):
            assert torch.allclose(g, torch.full_like(g, 1 / total))
    # post-norm: with every alpha 0 a block is CN2(CN1(x))
    b = blocks[0]
    with torch.no_grad():
        for g in (b.ls1.gamma, b.ls2.gamma, b.conv_units[0].alpha.gamma, b.conv_units[1].alpha.gamma):
            g.zero_()
        x = torch.randn(2, 256, 16)
        torch.testing.assert_close(b(x, b.attn.layout), b.norm2(b.norm1(x)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation helper
def test_flatten_swin_layout_and_384_pos_enc_resize():
    model = vitlab.create_model("flatten_swin_tiny", **SMALL)
    for i, stage in enumerate(model.layers):
        for j, b in enumerate(stage.blocks):
            linear = i < 2
            assert (b.attn.core.name == "focused_linear") == linear
            assert hasattr(b.attn, "relative_position_bias_table") != linear
            assert group_grid(b) == ((16 // 2 ** i,) * 2 if linear else (min(4, 16 // 2 ** i),) * 2)
    assert model.layers[1].blocks[1].attn.grouping.shift_size == (0, 0) and model.layers[2].blocks[1].attn.grouping.shift_size == (0, 0)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("pos_enc"):
                p.normal_()
    big = vitlab.create_model("flatten_swin_tiny", **{**SMALL, "img_size": 128, "window_size": 8})
    big.load_state_dict(model.state_dict())
    key = "layers.0.blocks.0.attn.pos_enc"
    src = model.state_dict()[key].reshape(1, 16, 16, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(src, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    got = big.state_dict()[key].reshape(1, 32, 32, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the 384 recipe uses window 12 in the softmax stages (FLatten-Swin-B@384)
    with torch.device("meta"):
        m384 = vitlab.create_model("flatten_swin_base", img_size=384)
    assert group_grid(m384.layers[2].blocks[0]) == (12, 12) and group_grid(m384.layers[0].blocks[0]) == (96, 96)
    assert m384.default_cfg["input_size"] == (3, 384, 384) and m384.default_cfg["crop_pct"] == 1.0


def test_registered_names():
    names = set(vitlab.list_models("*swin*"))
    for n in ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
              "lipsformer_swin_tiny", "lipsformer_swin_small", "lipsformer_swin_base", "flatten_swin_tiny",
              "flatten_swin_small", "flatten_swin_base"]:
        assert n in names
    m = vitlab.create_model(SWIN_T, **SMALL)
    assert isinstance(m, SwinTransformer) and m.default_cfg["architecture"] == SWIN_T
    nwd = m.no_weight_decay()
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in nwd
    assert "layers.0.blocks.0.attn.qkv.weight" not in nwd
    assert math.isclose(m.default_cfg["crop_pct"], 0.9)
