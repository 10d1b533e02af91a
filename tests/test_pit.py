"""PiT ("Rethinking Spatial Dimensions of Vision Transformers", Heo et al., ICCV 2021): timm parity for every
size, parameter counts vs timm and the paper, the pooling layer against loops, the class tokens carried
through the Backbone's downsamplers, the distilled head, the parts every family takes."""
import math

import pytest
import torch
from torch import nn

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.layers import FeatScale, MultiHeadAttention, Pooling as PoolMixer, TokenLayout, record_attention
from vitlab.models.pit import Pooling

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"pit_{s}_{d}224" for s in ("ti", "xs", "s", "b") for d in ("", "distilled_")]
# dims 16, 16, 32 on a 7 -> 4 -> 2 map (patch 8, stride 4 on 32 px)
SMALL = dict(img_size=32, patch_size=8, stride=4, base_dims=(8, 8, 8), depth=(1, 1, 1), heads=(2, 2, 4),
             num_classes=10)


def _small(name="pit_ti_224", **kw):
    return vitlab.create_model(name, **{**SMALL, **kw})


# -- timm: parity, counts, intermediates ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_timm_parity_every_size(name):
    from parity import check_parity

    # every parameter randomised; logits, stage maps and the state dict back to timm
    rep = check_parity(name, img_size=64, depth=(1, 1, 1))
    assert len(rep.intermediates) == 4 and not rep.notes  # forward_features + the 3 stage maps compared


@pytest.mark.parametrize("name", NAMES)
def test_param_counts_equal_timm(name):
    with torch.device("meta"):
        ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == ref


@pytest.mark.parametrize("size,millions", [("ti", 4.9), ("xs", 10.6), ("s", 23.5), ("b", 73.8)])
def test_param_counts_match_the_paper(size, millions):
    # the official README's model table (naver-ai/pit; the paper's sec. 3.4), in millions to one decimal; PiT-Ti has
    # 4.847 M (timm and the official code), which the paper gives as 4.9 M: hence 0.06 M, not 0.05 M
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(f"pit_{size}_224").parameters())
    assert abs(n / 1e6 - millions) < 0.06


@torch.no_grad()
def test_forward_intermediates_and_features_equal_timm():
    from parity import timm_pair

    ref, ours = timm_pair("pit_s_distilled_224", img_size=64, depth=(1, 2, 1))
    x = torch.randn(2, 3, 64, 64)
    for kw in (dict(), dict(indices=[0, 2]), dict(indices=1, stop_early=True), dict(indices=[1], stop_early=True)):
        f_ours, i_ours = ours.forward_intermediates(x, **kw)
        f_ref, i_ref = ref.forward_intermediates(x, **kw)
        assert [t.shape for t in i_ours] == [t.shape for t in i_ref]
        for a, b in zip([f_ours] + i_ours, [f_ref] + i_ref):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5, kw
    assert ours.forward_features(x).shape == (2, 2, 576)  # the normalised class and distillation tokens
    assert ours.feature_info == ref.feature_info


def test_drop_path_schedule_equals_timm():
    kw = dict(img_size=64, depth=(2, 3, 2), drop_path_rate=0.3)
    rates = lambda m: [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in m.modules()  # noqa: E731
                       if type(b).__name__ == "Block"]
    ours, ref = rates(vitlab.create_model("pit_ti_224", **kw)), rates(timm.create_model("pit_ti_224", **kw))
    assert len(ours) == 7 and ours == pytest.approx(ref) and ours[-1] == pytest.approx(0.3)


def test_converter_reads_the_official_layout_and_resizes_the_table():
    ref = timm.create_model("pit_ti_224", img_size=64, depth=(1, 1, 1))
    official = {k.replace("transformers.1.pool.", "pools.0.").replace("transformers.2.pool.", "pools.1."): v
                for k, v in ref.state_dict().items()}
    ours = vitlab.create_model("pit_ti_224", img_size=64, depth=(1, 1, 1))
    load_timm_weights(ours, official)
    table = ref.pos_embed  # timm's (1, C, h, w) map is vitlab's (1, h*w, C) tokens, raster order
    torch.testing.assert_close(ours.pos_embed, table.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(ours.transformers[2].downsample.fc.weight, ref.transformers[2].pool.fc.weight)
    assert set(to_timm_state_dict(ours)) == set(ref.state_dict())
    bigger = vitlab.create_model("pit_ti_224", img_size=96, depth=(1, 1, 1))  # a 7x7 table fitted to 11x11
    load_timm_weights(bigger, ref.state_dict())
    assert bigger.pos_embed.shape == (1, 121, 64)


# -- the new parts against loops -----------------------------------------------------------------------
def test_pooling_equals_loops_over_the_map_and_a_matmul_on_the_class_tokens():
    torch.manual_seed(0)
    pool = Pooling(3, 6, stride=2)
    with torch.no_grad():
        pool.conv.bias.normal_()
    h, w, p = 5, 4, 2
    x = torch.randn(2, p + h * w, 3)
    y, hw = pool(x, TokenLayout((h, w), p))
    assert hw == (3, 2) == pool.out_size((h, w)) and y.shape == (2, p + 6, 6)
    fm = torch.nn.functional.pad(x[:, p:].transpose(1, 2).reshape(2, 3, h, w), (1, 1, 1, 1))
    want = torch.zeros(2, 6, 3, 2)
    for o in range(6):  # output channel o filters input channel o // 2 (2 filters per channel)
        for i in range(3):
            for j in range(2):
                patch = fm[:, o // 2, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                want[:, o, i, j] = (patch * pool.conv.weight[o, 0]).sum((-2, -1)) + pool.conv.bias[o]
    torch.testing.assert_close(y[:, p:], want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, :p], x[:, :p] @ pool.fc.weight.T + pool.fc.bias, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of in_dim"):
        Pooling(4, 6)


@torch.no_grad()
def test_class_tokens_are_carried_through_the_poolings_by_the_backbone():
    m = _small("pit_ti_distilled_224").eval()
    x = torch.randn(2, 3, 32, 32)
    halves = m.forward_halves(x)
    downs = [e for e in halves if e.kind == "downsample"]
    assert [e.spatial_shape for e in downs] == [(4, 4), (2, 2)] and all(e.prefix.shape[1] == 2 for e in downs)
    before = [e for e in halves if e.name == "transformers.0.blocks.0.mlp"][0]  # the last block of stage 0
    fc = m.transformers[1].downsample.fc
    torch.testing.assert_close(downs[0].prefix, fc(before.prefix), rtol=0, atol=0)
    # the head reads the final norm of the carried class / distillation tokens
    last = halves[-2]
    want = (m.head(m.norm(last.prefix)[:, 0]) + m.head_dist(m.norm(last.prefix)[:, 1])) / 2
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=1e-6)
    stem = m.patch_embed.conv(x).flatten(2).transpose(1, 2) + m.pos_embed  # the table on the map only
    tokens, layout = m.forward_stem(x)
    assert layout == TokenLayout((7, 7), 2)
    torch.testing.assert_close(tokens, torch.cat([m.cls_token.expand(2, -1, -1), stem], 1), rtol=0, atol=0)


@torch.no_grad()
def test_attention_is_recorded_over_class_tokens_and_each_stage_map():
    m = _small().eval()
    with record_attention(m) as rec:
        m(torch.randn(2, 3, 32, 32))
    maps, layouts = rec.last(), rec.last_layouts()
    assert {n: tuple(t.shape) for n, t in maps.items()} == {
        "transformers.0.blocks.0.attn": (2, 2, 50, 50), "transformers.1.blocks.0.attn": (2, 2, 17, 17),
        "transformers.2.blocks.0.attn": (2, 4, 5, 5)}
    assert layouts["transformers.1.blocks.0.attn"] == TokenLayout((4, 4), 1)
    for t in maps.values():
        torch.testing.assert_close(t.sum(-1), torch.ones(t.shape[:-1]))


# -- the distilled head and the contract -------------------------------------------------------------------
def test_distilled_heads_train_and_eval():
    m = _small("pit_xs_distilled_224")
    x = torch.randn(2, 3, 32, 32)
    feats = m.eval().forward_features(x)
    torch.testing.assert_close(m(x), (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2)
    m.train().set_distilled_training(True)
    cls, dist = m(x)
    assert cls.shape == dist.shape == (2, 10)
    assert isinstance(m.get_classifier(), tuple) and m.pretrained_cfg["classifier"] == ("head", "head_dist")
    m.reset_classifier(3)
    assert m.head_dist.out_features == 3 and m.eval()(x).shape == (2, 3)
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), m.forward_features(x).mean(1))  # pre-logits: the mean of the two tokens
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="avg")


def test_contract_details():
    m = _small()
    assert {"pos_embed", "cls_token"} <= m.no_weight_decay()
    assert m.pretrained_cfg["input_size"] == (3, 32, 32) and m.pretrained_cfg["first_conv"] == "patch_embed.conv"
    assert [d["reduction"] for d in m.feature_info] == [4, 8, 16]
    groups = m.group_matcher()
    assert "patch_embed" in groups["stem"] and "cls_token" in groups["stem"]
    with pytest.raises(ValueError, match="img_size=64"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        _small(global_pool="avg")
    with pytest.raises(ValueError, match=r"heads needs 3 positive values"):
        _small(heads=(2, 2))


def test_init_none_is_pytorchs_default_and_named_inits_apply():
    torch.manual_seed(0)
    plain = _small()  # the official code leaves every Linear at PyTorch's default (uniform, biases too)
    fc1 = plain.transformers[0].blocks[0].mlp.fc1.requires_grad_(False)
    assert float(fc1.bias.abs().max()) > 0 and float(fc1.weight.abs().max()) <= 1 / math.sqrt(fc1.in_features)
    named = _small(init="trunc_normal")
    assert float(named.transformers[0].blocks[0].mlp.fc1.bias.detach().abs().max()) == 0.0


# -- the parts every family takes ----------------------------------------------------------------------------
def _train_step(m):
    out = m(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert not [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


@pytest.mark.parametrize("parts, holds", [
    (dict(mixer="pooling"), lambda m: all(isinstance(b.attn, PoolMixer) for b in _blocks(m))),
    (dict(core="cosine", mixer_kwargs=dict(tau=5.0)), lambda m: all(b.attn.core.name == "cosine" for b in _blocks(m))),
    (dict(mixer="focused_linear"), lambda m: all(b.attn.core.name == "focused_linear" for b in _blocks(m))),
    (dict(modifiers=("talking_heads",)), lambda m: all(hasattr(b.attn, "proj_l") for b in _blocks(m))),
    (dict(norm="rms"), lambda m: type(m.norm).__name__ != "LayerNorm" and all(
        type(b.norm1) is type(m.norm) for b in _blocks(m))),
    (dict(branch_scale="layerscale", shortcut_init=0.25), lambda m: all(
        torch.all(b.ls1.gamma == 0.25) for b in _blocks(m))),
    (dict(featscale=True), lambda m: all(isinstance(b.featscale, FeatScale) for b in _blocks(m))),
    (dict(wiring="parallel"), lambda m: all(b.wiring == "parallel" for b in _blocks(m))),
], ids=["pooling", "cosine", "focused_linear", "talking_heads", "rms", "layerscale", "featscale", "parallel"])
def test_parts_every_family_takes(parts, holds):
    m = _small(**parts)
    assert holds(m)
    _train_step(m)


def _blocks(m):
    return [b for s in m.transformers for b in s.blocks]


def test_parts_change_the_function_and_refusals_are_one_line():
    torch.manual_seed(0)
    base = _small().eval()
    post = _small(wiring="post").eval()
    post.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert float((base(x) - post(x)).abs().max()) > 1e-4  # same weights, another wiring: another function
    assert isinstance(base.transformers[0].blocks[0].attn, MultiHeadAttention)
    with pytest.raises(ValueError, match="focused_linear never forms the attention matrix; talking_heads needs it"):
        _small(core="focused_linear", modifiers=("talking_heads",))
    with pytest.raises(ValueError, match="'tua'"):
        _small(mixer="cosine", mixer_kwargs={"tua": 5})
    with pytest.raises(ValueError, match="banana"):
        _small(banana=1)
    with pytest.raises(KeyError, match="featscale"):  # a vitlab-only part: the strict timm load names the keys
        load_timm_weights(_small(featscale=True), timm.create_model("pit_ti_224", **SMALL).state_dict())


def test_the_class_token_gets_its_gradient_through_every_pooling():
    m = _small()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    for s in m.transformers[1:]:
        assert float(s.downsample.fc.weight.grad.abs().sum()) > 0
    assert isinstance(m.transformers[1].downsample, nn.Module) and m.cls_token.grad.abs().sum() > 0


@torch.no_grad()
def test_forward_intermediates_norm_applies_the_final_norm_to_the_last_map_only():
    m = _small().eval()
    x = torch.randn(2, 3, 32, 32)
    plain = m.forward_intermediates(x, intermediates_only=True)
    normed = m.forward_intermediates(x, norm=True, intermediates_only=True)
    torch.testing.assert_close(normed[:2], plain[:2], rtol=0, atol=0)
    want = m.norm(plain[2].flatten(2).transpose(1, 2)).transpose(1, 2).reshape(plain[2].shape)
    torch.testing.assert_close(normed[2], want, atol=1e-6, rtol=1e-6)
