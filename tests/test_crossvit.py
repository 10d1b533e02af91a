"""CrossViT: parameter counts vs timm and a hand count of the official code's layers, timm parity (every parameter
randomised) for every size variant with features and intermediates, the fusion's cross-attention against an
explicit einsum, the model contract, the part options, and the vit-pytorch class."""
import math

import pytest
import torch

import vitlab
from vitlab.layers import TokenLayout, record_attention
from vitlab.models.crossvit import _SIZES

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

# 120 px: 10x10 small patches and 112 px / 16 = 7x7 large ones at every recipe's img_scale (dagger stems included)
SMALL = dict(img_size=120, embed_dim=(32, 64), depth=((1, 2, 0), (1, 1, 0)), num_heads=(2, 4))
TINY = dict(img_size=30, patch_size=(3, 4), embed_dim=(16, 32), depth=((1, 2, 0), (2, 1, 0)), num_heads=(2, 2),
            num_classes=10)  # 10x10 and 7x7 tokens: 28 px / 4


def _official_count(embed_dim, depth, num_heads, mlp_ratio, multi_conv, img_size, img_scale, patch_size=(12, 16),
                    classes=1000):
    """Parameters of the official CrossViT (IBM/CrossViT models/crossvit.py), counted layer by layer by hand."""
    n = 0
    for c, p, s in zip(embed_dim, patch_size, img_scale):
        if multi_conv:  # 7x7/4 conv to C/4, 3x3 to C/2, 3x3 to C
            n += 3 * 49 * c // 4 + c // 4 + c // 4 * 9 * c // 2 + c // 2 + c // 2 * 9 * c + c
        else:
            n += 3 * p * p * c + c
        n += (1 + (int(img_size * s) // p) ** 2) * c + c  # position table with the class row, class token
        n += 2 * c + c * classes + classes  # final norm, head
    for cfg in depth:
        for b, (c, r) in enumerate(zip(embed_dim, mlp_ratio)):
            hidden = int(c * r)
            n += cfg[b] * (4 * c + 3 * c * c + 3 * c + c * c + c + c * hidden + hidden + hidden * c + c)
            o = embed_dim[1 - b]
            n += 2 * c + c * o + o  # f: LN, Linear to the other width
            n += 2 * o + 4 * (o * o + o)  # the fusion: LN, wq, wk, wv, proj
            n += 2 * o + o * c + c  # g: LN, Linear back
    return n


@pytest.mark.parametrize("name", list(_SIZES))
def test_parameter_counts_equal_timm_and_the_official_layers(name):
    with torch.device("meta"):
        ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
    cfg = _SIZES[name][1]
    assert ours == ref == _official_count(cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["mlp_ratio"],
                                          cfg["multi_conv"], cfg["img_size"], cfg["img_scale"])


@pytest.mark.parametrize("name", list(_SIZES))
def test_timm_parity_every_variant(name):
    """Logits both ways (check_parity), then the branch features, timm's forward_intermediates and vitlab's
    forward_halves (matched in order by parity.py's rule) against the same randomised timm model."""
    from parity import _match_in_order, check_parity, timm_pair

    # timm's crossvit_18_240 entry point passes its kwargs twice, so it takes no size override but img_size
    kw = dict(img_size=120) if name == "crossvit_18_240" else SMALL
    check_parity(name, intermediates=False, **kw)  # forward_features is a list: compared below
    ref, ours = timm_pair(name, **kw)
    x = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours.forward_features(x), ref.forward_features(x)):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4
        want = ref.forward_intermediates(x, intermediates_only=True)
        assert len(want) == 2 * len(ours.blocks) and max(_match_in_order(want, [e.feature for e in ours.forward_halves(x)])) < 1e-4
        for kw in (dict(), dict(indices=[0, 3], norm=True), dict(indices=2, output_fmt="NLC"),
                   dict(indices=[0, 2], stop_early=True, norm=True)):
            (f_ours, i_ours), (f_ref, i_ref) = ours.forward_intermediates(x, **kw), ref.forward_intermediates(x, **kw)
            assert len(i_ours) == len(i_ref) and len(f_ours) == len(f_ref) == 2, kw
            for a, b in zip(f_ours + i_ours, f_ref + i_ref):
                assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4, kw


# -- sides a branch's patch does not divide: grids floored as timm's -------------------------------------------
def _floored_tables(sizes, patches):
    """timm's ``_compute_num_patches`` with its one bug fixed: ``(side // p) ** 2`` rows, the tokens its floored
    patch conv gives (timm reads ``side // p * side // p`` left to right)."""
    return [(s[0] // p) * (s[1] // p) for s, p in zip(sizes, patches)]


def test_timm_sizes_its_tables_by_a_misread_product_at_such_sides():
    """Why the parity below fixes one line of timm: at 224 branch 0 has 224 // 12 = 18 patches a side (324 tokens)
    but timm's table 1 + 18 * 224 // 12 = 337 rows, so timm's model builds and cannot run; at 38 (3 and 2 patches
    a side, remainders 2 and 3) the misread product happens to be right and timm runs unchanged."""
    small = dict(embed_dim=(16, 32), depth=((1, 1, 0),), num_heads=(2, 2))
    ref = timm.create_model("crossvit_9_240", img_size=100, **small)
    ours = vitlab.create_model("crossvit_9_240", img_size=100, **small)
    assert [t.shape[1] for t in (ref.pos_embed_0, ref.pos_embed_1)] == [1 + 8 * 100 // 12, 1 + 5 * 93 // 16] == [67, 30]
    assert [t.shape[1] for t in (ours.pos_embed_0, ours.pos_embed_1)] == [1 + 8 * 8, 1 + 5 * 5]
    with pytest.raises(RuntimeError, match="must match"):
        ref(torch.randn(1, 3, 100, 100))
    assert ours(torch.randn(1, 3, 100, 100)).shape == (1, 1000)
    with torch.device("meta"):
        assert (sum(p.numel() for p in timm.create_model("crossvit_9_240", img_size=224).parameters())
                - sum(p.numel() for p in vitlab.create_model("crossvit_9_240", img_size=224).parameters())) == 12 * 128


@pytest.mark.parametrize("name,kw,fixed", [
    ("crossvit_9_240", dict(img_size=224), True),  # 224 / 12 and 209 / 16 not whole: grids 18 and 13
    ("crossvit_9_240", dict(SMALL, img_size=100), True),  # 100 and 93: grids 8 and 5
    ("crossvit_9_240", dict(SMALL, img_size=38), False),  # 38 and 35: grids 3 and 2, timm unchanged
    ("crossvit_15_dagger_240", dict(SMALL, img_size=121), False),  # dagger: 121 = 10 * 12 + 1 and 112 = 7 * 16
])
def test_timm_parity_at_sides_the_patch_does_not_divide(name, kw, fixed, monkeypatch):
    """Every parameter randomised, logits both ways (check_parity: equal parameter counts, timm's keys), the branch
    features and timm's forward_intermediates on the floored grids; the parameter count is the official layers'
    with floored grids."""
    from parity import check_parity, timm_pair

    if fixed:
        monkeypatch.setattr(timm.models.crossvit, "_compute_num_patches", _floored_tables)
    check_parity(name, intermediates=False, **kw)
    ref, ours = timm_pair(name, **kw)
    side = kw["img_size"]
    assert any(s % p for (s, _), p in zip(ours.img_size_scaled, ours.patch_size))
    cfg = {**_SIZES[name][1], **kw}
    assert sum(p.numel() for p in ours.parameters()) == _official_count(
        cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["mlp_ratio"], cfg["multi_conv"], side, cfg["img_scale"])
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(ours.forward_features(x), ref.forward_features(x)):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4
        got, want = ours.forward_intermediates(x, norm=True)[1], ref.forward_intermediates(x, norm=True)[1]
        assert [t.shape[-1] for t in got] == [s // p for (s, _), p in zip(ours.img_size_scaled, ours.patch_size)
                                              for _ in ours.blocks]
        assert all(a.shape == b.shape and float((a - b).abs().max()) < 1e-4 for a, b in zip(got, want))


def test_drop_path_schedule_and_feature_info_equal_timm():
    kw = dict(SMALL, drop_path_rate=0.3)
    ref, ours = timm.create_model("crossvit_9_240", **kw), vitlab.create_model("crossvit_9_240", **kw)
    rates = lambda m: [round(mod.drop_prob, 6) for mod in m.modules() if type(mod).__name__ == "DropPath"]  # noqa
    # rates (0, .15, .3) over 3 = 2 + 1 steps: block j of each branch at rate j of its slice (two DropPaths each),
    # both fusions at the slice's last; the two blocks at rate 0 have none
    assert rates(ours) == rates(ref) == [0.15] * 4 + [0.3] * 6
    assert ours.feature_info == ref.feature_info


def _fusion_by_einsum(msb, b, xs):
    """Eqs. 5-7 written out: f, one-query softmax attention over [f(cls); the other branch's patches], g."""
    o = 1 - b
    blk, attn = msb.fusion[b], msb.fusion[b].attn
    cls = msb.projs[b](xs[b][:, :1])
    z = blk.norm1(torch.cat([cls, xs[o][:, 1:]], dim=1))
    h = attn.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1)  # noqa: E731
    q, k, v = split(attn.q(z[:, :1])), split(attn.k(z)), split(attn.v(z))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = logits.softmax(-1)
    y = attn.proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2))
    return torch.cat([msb.revert_projs[b](cls + y), xs[b][:, 1:]], dim=1), probs


def test_cross_attention_fusion_equals_explicit_einsum():
    torch.manual_seed(0)
    m = vitlab.create_model("crossvit_9_240", **TINY).eval()
    msb = m.blocks[0]
    xs = [torch.randn(2, 101, 16), torch.randn(2, 50, 32)]
    with torch.no_grad():
        got = msb.fuse(xs)
        with record_attention(m) as rec:
            msb.fuse(xs)
        for b in (0, 1):
            want, probs = _fusion_by_einsum(msb, b, xs)
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rec.last()[f"blocks.0.fusion.{b}.attn"], probs, rtol=1e-5, atol=1e-5)
    assert rec.last()["blocks.0.fusion.0.attn"].shape == (2, 2, 1, 50)  # branch 0's class token asks branch 1
    assert rec.last_layouts()["blocks.0.fusion.1.attn"].grid == (10, 10)


def test_model_contract_at_a_small_size():
    torch.manual_seed(0)
    m = vitlab.create_model("crossvit_9_dagger_240", img_size=120, embed_dim=(16, 32), depth=((1, 2, 0),) * 2,
                            num_heads=(2, 2), num_classes=10)
    x = torch.randn(2, 3, 120, 120)
    out = m(x)
    out.square().mean().backward()
    assert out.shape == (2, 10) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in inter] == [(16, 10, 10)] * 2 + [(32, 7, 7)] * 2
        halves = {h.name: h for h in m.forward_halves(x)}
        torch.testing.assert_close(inter[1], halves["blocks.1.blocks.0.0.mlp"].feature)
        torch.testing.assert_close(inter[3], halves["blocks.1.blocks.1.1.mlp"].feature)
        logits = torch.stack([m.head[b](halves[f"norm.{b}"].prefix[:, 0]) for b in (0, 1)]).mean(0)
        torch.testing.assert_close(m(x), logits)
        torch.testing.assert_close(m.forward_head(final), m(x))
        assert m.forward_head(final, pre_logits=True).shape == (2, 48) == (2, m.num_features)
        assert m(torch.randn(1, 3, 64, 80)).shape == (1, 10)  # any size: each branch resizes the image
        with record_attention(m) as rec:
            m(x)
    assert rec.last()["blocks.0.blocks.1.0.attn"].shape == (2, 2, 50, 50)
    assert not m.is_isotropic and [f["reduction"] for f in m.feature_info] == [12, 12, 17, 17]
    assert {"cls_token_0", "pos_embed_1", "blocks.0.fusion.0.attn.q.bias"} <= m.no_weight_decay()
    from timm.data import resolve_model_data_config
    from timm.models import group_parameters
    assert resolve_model_data_config(m)["input_size"] == (3, 120, 120)
    assert sum(len(g) for g in group_parameters(m, m.group_matcher()).values()) == len(list(m.parameters()))
    m.reset_classifier(3, global_pool="avg")
    assert m(x).shape == (2, 3) and m.pretrained_cfg["num_classes"] == 3 and m.default_cfg is m.pretrained_cfg
    assert len(m.get_classifier()) == 2
    assert m.prune_intermediate_layers([0, 2]) == [0, 2] and len(m.blocks) == 1 and m(x).shape == (2, 48)


def test_gradient_checkpointing_and_features_only():
    torch.manual_seed(0)
    m = vitlab.create_model("crossvit_9_240", **TINY)
    x = torch.randn(2, 3, 30, 30)
    m(x).sum().backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for a, p in zip(want, m.parameters()):
        torch.testing.assert_close(p.grad, a)
    feats = vitlab.create_model("crossvit_9_240", features_only=True, out_indices=(1, 3), **TINY)
    assert feats.feature_info.channels() == [16, 32] and [t.shape[-1] for t in feats(x)] == [10, 7]


@pytest.mark.parametrize("parts", [dict(mixer="pooling"), dict(core="cosine", mixer_kwargs=dict(tau=12.0)),
                                   dict(mixer="focused_linear"), dict(modifiers=("talking_heads",)),
                                   dict(norm="rms"), dict(featscale=True),
                                   dict(branch_scale="layerscale", shortcut_init=0.1), dict(wiring="post"),
                                   dict(wiring="parallel"), dict(mixer="cosine", mixer_kwargs=dict(tau=5.0))])
def test_part_options(parts):
    m = vitlab.create_model("crossvit_9_240", **TINY, **parts)
    out = m(torch.randn(2, 3, 30, 30))
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in m.parameters())
    blk = m.blocks[0].blocks[1][0]
    if "mixer" in parts or "core" in parts:
        assert type(blk.attn).__name__ == "Pooling" or blk.attn.core.name == parts.get("core", parts.get("mixer"))
    if parts.get("mixer") == "cosine":  # the fusion follows the cosine mixer, with its temperature
        assert m.blocks[0].fusion[0].attn.core.name == "cosine"
    if "wiring" in parts:
        assert blk.wiring == parts["wiring"] and m.blocks[0].fusion[0].wiring == "prefix"


def test_refusals():
    with pytest.raises(ValueError, match="fusion_mixer must be an attention mixer"):
        vitlab.create_model("crossvit_9_240", **TINY, fusion_mixer="pooling")
    with pytest.raises(ValueError, match="grouping 'class_query' cannot be combined with core 'focused_linear'"):
        vitlab.create_model("crossvit_9_240", **TINY, fusion_mixer="focused_linear")
    with pytest.raises(ValueError, match="depth needs one"):
        vitlab.create_model("crossvit_9_240", **dict(TINY, depth=((1, 2),)))
    with pytest.raises(ValueError, match="multi_conv .* 12 or 16, got 3"):
        vitlab.create_model("crossvit_9_dagger_240", **TINY)
    with pytest.raises(ValueError, match="a side of at least its patch, got 2 and 4"):  # int(3 * 28 / 30) = 2
        vitlab.create_model("crossvit_9_240", **dict(TINY, img_size=3))
    # the dagger stem gives ceil(209 / 16) = 14 tokens a side where the floored table has 13: timm builds it and
    # cannot run it, vitlab refuses it
    with pytest.raises(ValueError, match="gives a 209-pixel branch 14 tokens a side, not the floored grid's 13; "
                                         "expected a side of 16k pixels"):
        vitlab.create_model("crossvit_9_dagger_240", img_size=224)
    with pytest.raises(ValueError, match="a 105-pixel branch 9 tokens .* 8; expected a side of 12k . 0..8 pixels"):
        vitlab.create_model("crossvit_9_dagger_240", img_size=105, img_scale=(1.0, 1.0), patch_size=(12, 12))
    with pytest.raises(ValueError, match="tua"):
        vitlab.create_model("crossvit_9_240", **TINY, mixer="cosine", mixer_kwargs=dict(tua=1))


def test_fusion_depth_keeps_the_patches_as_keys():
    """L > 0 cross-attention blocks in turn between f and g: each sees the other branch's patch tokens."""
    torch.manual_seed(0)
    m = vitlab.create_model("crossvit_9_240", **dict(TINY, depth=((1, 1, 2),))).eval()
    msb = m.blocks[0]
    xs = [torch.randn(1, 101, 16), torch.randn(1, 50, 32)]
    with torch.no_grad(), record_attention(m) as rec:
        out = msb.fuse(xs)
        cls = msb.projs[0](xs[0][:, :1])
        for blk in msb.fusion[0]:
            z = torch.cat([cls, xs[1][:, 1:]], dim=1)
            cls = cls + blk.attn(blk.norm1(z), TokenLayout((7, 7), 1))
        torch.testing.assert_close(out[0][:, :1], msb.revert_projs[0](cls))
    assert rec.last()["blocks.0.fusion.0.1.attn"].shape == (1, 2, 1, 50)


# -- a checkpoint of another image size: both position tables resized on load ----------------------------------
@pytest.mark.parametrize("name,loaded,as_dir", [
    ("crossvit_9_240", dict(img_size=360), True),  # grids 20 / 14 -> 30 / 21; timm-keyed model directory
    ("crossvit_9_240", dict(img_size=120), False),  # -> 10 / 7
    ("crossvit_15_dagger_408", dict(img_size=240, img_scale=(1.0, 224 / 240)), False),  # 34 / 24 -> 20 / 14
    ("crossvit_9_240", dict(img_size=224), False),  # -> 224 // 12 = 18 / 209 // 16 = 13, floored
    ("crossvit_9_240", dict(img_size=100), True),  # -> 8 / 5
])
def test_checkpoint_of_another_image_size_resizes_both_position_tables(tmp_path, name, loaded, as_dir):
    """Weights saved at the recipe's size, loaded at another through the public paths (``create_pretrained`` from a
    file or a timm-keyed model directory, and the strict ``load_weights``): each ``pos_embed_{b}`` is timm's
    ``resample_abs_pos_embed`` of the saved one to its branch's grid, class row kept; every other tensor unchanged;
    the model runs at the new size."""
    from timm.layers import resample_abs_pos_embed

    from vitlab.interop.checkpoint import create_pretrained, load_weights, save_model_files

    kw = dict(embed_dim=(16, 32), depth=((1, 1, 0),), num_heads=(2, 2), num_classes=10)
    src = vitlab.create_model(name, **kw)
    path = str(tmp_path / "w.pth")
    if as_dir:
        save_model_files(src, path, name, kw)  # timm's keys (the fusion's wq/wk/wv), config.json
    else:
        torch.save(src.state_dict(), path)
    model, rep = create_pretrained(None if as_dir else name, path, **({} if as_dir else kw), **loaded)
    assert sorted(rep.adapted) == ["pos_embed_0", "pos_embed_1"] and not rep.new
    for b, grid in enumerate(model.pos_embed_grids):
        old = getattr(src, f"pos_embed_{b}").detach()
        side = math.isqrt(old.shape[1] - 1)
        want = resample_abs_pos_embed(old, list(grid), [side, side], num_prefix_tokens=1)
        assert want.shape[1] == 1 + grid[0] * grid[1] != old.shape[1]
        assert torch.equal(getattr(model, f"pos_embed_{b}").detach(), want) and torch.equal(want[:, 0], old[:, 0])
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in src.state_dict().items() if not k.startswith("pos_embed_"))
    if not as_dir:  # the strict path, on the vitlab-keyed file
        again = load_weights(vitlab.create_model(name, **kw, **loaded), path)
        assert all(torch.equal(v, own[k]) for k, v in again.state_dict().items())
    side = model.default_cfg["input_size"][-1]
    out = model.eval()(torch.randn(2, 3, side, side))
    assert side == loaded["img_size"] and out.shape == (2, 10) and torch.isfinite(out).all()


def test_checkpoint_of_a_floored_grid_loads_at_other_sizes(tmp_path):
    """Weights saved at 224 (grids 18 / 13 on 224 / 209 pixels) loaded at 240 (20 / 14) and at 100 (8 / 5): each
    table is timm's ``resample_abs_pos_embed`` of the saved one, the class row kept, every other tensor equal."""
    from timm.layers import resample_abs_pos_embed

    from vitlab.interop.checkpoint import load_weights

    kw = dict(embed_dim=(16, 32), depth=((1, 1, 0),), num_heads=(2, 2), num_classes=10)
    src = vitlab.create_model("crossvit_9_240", img_size=224, **kw)
    assert src.pos_embed_grids == [(18, 18), (13, 13)]
    torch.save(src.state_dict(), tmp_path / "w224.pth")
    for side, grids in ((240, [(20, 20), (14, 14)]), (100, [(8, 8), (5, 5)])):
        model = vitlab.create_model("crossvit_9_240", img_size=side, **kw)
        load_weights(model, str(tmp_path / "w224.pth"))
        assert model.pos_embed_grids == grids
        for b, (old, grid) in enumerate(zip((18, 13), grids)):
            want = resample_abs_pos_embed(getattr(src, f"pos_embed_{b}").detach(), list(grid), [old, old],
                                          num_prefix_tokens=1)
            assert torch.equal(getattr(model, f"pos_embed_{b}").detach(), want)
        own = model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in src.state_dict().items() if not k.startswith("pos_embed_"))
        assert torch.isfinite(model.eval()(torch.randn(1, 3, side, side))).all()


def test_vit_pytorch_readme_example_with_only_the_import_changed():
    from vit_pytorch.cross_vit import CrossViT as Reference

    from vitlab.compat.vit_pytorch.cross_vit import CrossViT

    kw = dict(image_size=256, num_classes=1000, depth=4, sm_dim=192, sm_patch_size=16, sm_enc_depth=2,
              sm_enc_heads=8, sm_enc_mlp_dim=2048, lg_dim=384, lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8,
              lg_enc_mlp_dim=2048, cross_attn_depth=2, cross_attn_heads=8, dropout=0.1, emb_dropout=0.1)
    v = CrossViT(**kw)
    img = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        pred = v(img)
        assert pred.shape == Reference(**kw)(img).shape == (1, 1000)
    fusion = v.blocks[0].fusion[0][1].attn  # two rounds, 8 heads of 64 over the large branch's 384 channels
    assert (fusion.num_heads, fusion.head_dim, fusion.dim) == (8, 64, 384)
    assert v.blocks[0].blocks[0][0].mlp.fc1.out_features == 2048 and v.blocks[0].blocks[0][0].attn.head_dim == 64
    with pytest.raises(ValueError, match="lg_enc_dim_head=32"):
        CrossViT(**kw, lg_enc_dim_head=32)
