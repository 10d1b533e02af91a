"""MaxViT (Tu et al., ECCV 2022): timm parity of every registered size (every parameter and BatchNorm statistic
randomised, eval mode) and its ``forward_intermediates``, at 384 px with 12 x 12 windows too, exact parameter
counts and data configs of every timm name (224 / 384 / 512, XL included) against timm and the paper,
the ``grid`` and ``window`` partitions against explicit index lists, the relative-table conversion against
timm's TF lookup, MBConv's TF SAME padding at odd sizes against timm, vitlab's part options and refusals, the
model contract, and vit-pytorch's README example through the compat class."""
import pytest
import timm
import torch

import vitlab
from parity import check_parity, randomize_, timm_pair
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["maxvit_tiny_tf_224", "maxvit_small_tf_224", "maxvit_base_tf_224", "maxvit_large_tf_224"]
# timm and vitlab take the same keywords; img 64: windows and grids of 2 (img // 32) on 16, 8, 4, 2 maps
SMALL = dict(img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 2, 1, 1), stem_width=16, head_hidden_size=24,
             num_classes=10)


def _x(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- timm parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_timm_every_size(name):
    kw = dict(SMALL, depths=(1, 2, 1, 1) if name == NAMES[0] else (1, 1, 1, 1))
    rep = check_parity(name, **kw)
    assert len(rep.intermediates) == 1 + 5 and not rep.notes  # forward_features, the stem and four stages


@torch.no_grad()
def test_forward_intermediates_equal_timm():
    ref, ours = timm_pair("maxvit_tiny_tf_224", **SMALL)
    x = _x()
    for kw in (dict(indices=None), dict(indices=[0, 2]), dict(indices=2, norm=True), dict(indices=[-1])):
        a = ours.forward_intermediates(x, intermediates_only=True, **kw)
        b = ref.forward_intermediates(x, intermediates_only=True, **kw)
        assert [t.shape for t in a] == [t.shape for t in b]
        assert max(float((s - t).abs().max()) for s, t in zip(a, b)) < 1e-4
    fa, ia = ours.forward_intermediates(x, indices=[0, 1], stop_early=True)
    fb, ib = ref.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert fa.shape == fb.shape and float((fa - fb).abs().max()) < 1e-4
    assert [i["reduction"] for i in ours.feature_info] == [i["reduction"] for i in ref.feature_info]
    assert [i["num_chs"] for i in ours.feature_info] == [i["num_chs"] for i in ref.feature_info]


@pytest.mark.parametrize("name", NAMES)
def test_param_counts_equal_timm_and_the_paper(name):
    paper = {"tiny": 31, "small": 69, "base": 120, "large": 212}  # Table 1 / Table 2, millions, rounded
    with torch.device("meta"):
        ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == ref
    assert abs(ours / 1e6 - paper[name.split("_")[1]]) < 0.6  # B: 119.47 M, which the paper gives as 120


ALL = vitlab.list_models("maxvit_*")


def test_every_timm_maxvit_tf_name_is_registered():
    assert ALL == timm.list_models("maxvit_*_tf_*") and len(ALL) == 15


@torch.no_grad()
def test_parity_with_timm_at_384_with_windows_of_12():
    """The 384 recipe at its own size (maps 96, 48, 24, 12: windows and grids of 384 // 32 = 12 on every
    stage) with narrow stages; smooth images, as random pixels average out over a 12 x 12 map."""
    kw = dict(embed_dim=(32, 32, 32, 32), depths=(1, 1, 1, 1), stem_width=8, head_hidden_size=16, num_classes=10)
    x = torch.nn.functional.interpolate(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),
                                        size=384, mode="bilinear") * 2
    rep = check_parity("maxvit_tiny_tf_384", x=x, **kw)
    assert len(rep.intermediates) == 1 + 5 and not rep.notes
    attn = vitlab.create_model("maxvit_tiny_tf_384", **kw).stages[3].blocks[0].attn_grid.attn
    assert attn.relative_position_bias_table.shape == ((2 * 12 - 1) ** 2, 1)


@pytest.mark.parametrize("name", [n for n in ALL if n not in NAMES])
def test_param_counts_equal_timm_and_the_paper_at_every_resolution(name):
    paper = {"tiny": 31, "small": 69, "base": 120, "large": 212}  # Table 2 at 384 / 512, millions, rounded
    with torch.device("meta"):
        ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == ref  # only the relative tables grow with the window: (2 * img / 32 - 1)^2 per head
    size = name.split("_")[1]
    if size in paper:
        assert abs(ours / 1e6 - paper[size]) < 0.6


@pytest.mark.parametrize("name", ALL)
def test_data_config_equals_timms_default_tag(name):
    """Input size, classes (XL at 224: the ImageNet-21K model), normalisation and crop of timm's default tag."""
    with torch.device("meta"):
        ours, ref = vitlab.create_model(name).default_cfg, timm.create_model(name).pretrained_cfg
    for key in ("input_size", "mean", "std"):
        assert tuple(ours[key]) == tuple(ref[key]), (key, ours[key], ref[key])
    assert (ours["num_classes"], ours["crop_pct"], ours.get("crop_mode", "center")) == (
        ref["num_classes"], ref["crop_pct"], ref["crop_mode"])


# -- the grid and window partitions: explicit index lists ---------------------------------------------------
@pytest.mark.parametrize("hw,size", [((8, 8), 2), ((6, 9), 3), ((4, 6), 2)])
def test_grid_and_window_partitions_are_the_papers_index_lists(hw, size):
    """Block attention: window (i, j) holds map positions (i*P + a, j*P + b); grid attention: group (i, j)
    holds (a * H/G + i, b * W/G + j) (sec. 3.2, Fig. 3), each in raster order of (a, b); both invert."""
    h, w = hw
    pos = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)
    for kind in ("window", "grid"):
        key = "window_size" if kind == "window" else "grid_size"
        attn = MultiHeadAttention(4, 1, grouping=(kind, {key: size}), layout=TokenLayout(hw))
        groups, _, state = attn.grouping.inputs(attn, pos, TokenLayout(hw))
        nh, nw = h // size, w // size
        assert groups.shape == (nh * nw, size * size, 1)
        for i in range(nh):
            for j in range(nw):
                if kind == "window":
                    expect = [(i * size + a) * w + j * size + b for a in range(size) for b in range(size)]
                else:
                    expect = [(a * nh + i) * w + b * nw + j for a in range(size) for b in range(size)]
                assert groups[i * nw + j, :, 0].tolist() == expect, (kind, i, j)
        torch.testing.assert_close(attn.grouping.outputs(attn, groups, state), pos)


def test_grid_attention_is_brute_force_attention_inside_each_group():
    """The grouping inside a whole attention call: each grid group attends only to itself, with the relative
    bias of its (a, b) offsets, computed by explicit einsum over index lists."""
    torch.manual_seed(0)
    h = w = 4
    g, heads, dim = 2, 2, 8
    attn = randomize_(MultiHeadAttention(dim, heads, grouping=("grid", dict(grid_size=g)), position=("relative",),
                                         layout=TokenLayout((h, w)))).eval()
    x = torch.randn(1, h * w, dim)
    with torch.no_grad():
        got = attn(x, TokenLayout((h, w)))
        q, k, v = attn.qkv(x).reshape(1, h * w, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        table, out = attn.relative_position_bias_table, torch.zeros(1, heads, h * w, dim // heads)
        for i in range(h // g):
            for j in range(w // g):
                cells = [(a, b) for a in range(g) for b in range(g)]
                idx = [(a * (h // g) + i) * w + b * (w // g) + j for a, b in cells]
                bias = torch.stack([torch.stack([table[(qa - ka + g - 1) * (2 * g - 1) + qb - kb + g - 1]
                                                 for ka, kb in cells]) for qa, qb in cells]).permute(2, 0, 1)
                logits = torch.einsum("hqd,hkd->hqk", q[0][:, idx], k[0][:, idx]) * (dim // heads) ** -0.5 + bias
                out[0][:, idx] = torch.einsum("hqk,hkd->hqd", logits.softmax(-1), v[0][:, idx])
        want = attn.proj(out.transpose(1, 2).reshape(1, h * w, dim))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_relative_table_conversion_gives_timms_tf_bias():
    """timm's RelPosBiasTf bias (an einsum of one-hot lookups) equals the Swin-layout table's bias after
    the converter's flip, for a non-square window; and the conversion inverts."""
    from timm.layers import RelPosBiasTf

    from vitlab.interop.timm_maxvit import table_from_tf, table_to_tf
    from vitlab.layers.window import relative_position_index

    rel = RelPosBiasTf(window_size=(2, 3), num_heads=3)
    torch.nn.init.normal_(rel.relative_position_bias_table)
    tf = rel.relative_position_bias_table.detach()
    ours = table_from_tf(tf)
    idx = relative_position_index(2, 3)
    torch.testing.assert_close(ours[idx.reshape(-1)].view(6, 6, 3).permute(2, 0, 1), rel.get_bias().detach())
    torch.testing.assert_close(table_to_tf(ours, (2, 3)), tf)


# -- MBConv and the stem: TF SAME padding at odd sizes ---------------------------------------------------
@pytest.mark.parametrize("stride,size", [(2, 13), (2, 12), (1, 7)])
def test_mbconv_equals_timm_at_odd_sizes(stride, size):
    from timm.models.maxxvit import MaxxVitConvCfg, MbConvBlock

    from vitlab.layers.mbconv import MBConv

    cfg = MaxxVitConvCfg(norm_eps=1e-3, act_layer="gelu_tanh", padding="same")
    cin = 8 if stride == 2 else 16
    ref = randomize_(MbConvBlock(cin, 16, stride=stride, cfg=cfg)).eval()
    ours = MBConv(cin, 16, stride=stride, act=lambda: torch.nn.GELU(approximate="tanh")).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, cin, size, size)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 16, -(-size // stride), -(-size // stride))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- part options and refusals -------------------------------------------------------------------------------
TINY = dict(img_size=32, embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=8, head_hidden_size=16,
            dim_head=8, num_classes=10)


def _train_step(model, size=32):
    model.train()
    out = model(_x(2, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("parts", [dict(mixer="cosine"), dict(core="focused_linear"), dict(core="cross_covariance"),
                                   dict(mixer="pooling"),
                                   dict(modifiers=("talking_heads",)), dict(modifiers=("reattention",)),
                                   dict(norm="rms"), dict(branch_scale="layerscale", shortcut_init=0.1),
                                   dict(featscale=True), dict(wiring="post"), dict(wiring="parallel"),
                                   dict(mixer="cosine", mixer_kwargs=dict(tau=5.0))], ids=str)
def test_part_options(parts):
    model = vitlab.create_model("maxvit_tiny_tf_224", **TINY, **parts)
    _train_step(model)
    mods = list(model.modules())
    if "core" in parts:
        assert any(getattr(getattr(m, "core", None), "name", None) == parts["core"] for m in mods)
    if "modifiers" in parts:
        assert any(parts["modifiers"][0] in [p.name for p in getattr(m, "modifiers", [])] for m in mods)
    if parts.get("mixer") == "pooling":
        assert not [n for n, _ in model.named_parameters() if "relative_position" in n]


def test_refusals_are_one_clear_error():
    with pytest.raises(ValueError, match="core 'cross_covariance' cannot be combined with modifier 'talking_heads'"):
        vitlab.create_model("maxvit_tiny_tf_224", **TINY, core="cross_covariance", modifiers=("talking_heads",))
    with pytest.raises(ValueError, match="banana"):
        vitlab.create_model("maxvit_tiny_tf_224", **TINY, mixer_kwargs=dict(banana=1))
    with pytest.raises(ValueError, match="multiple of dim_head=32"):
        vitlab.create_model("maxvit_tiny_tf_224", embed_dim=(48, 64, 128, 256))


def test_talking_heads_full_size_builds_and_trains_one_step():
    model = vitlab.create_model("maxvit_tiny_tf_224", modifiers=("talking_heads",), num_classes=10,
                                drop_path_rate=0.0)  # batch 1: stochastic depth could drop a whole block
    attn = model.stages[2].blocks[0].attn_grid.attn
    assert [m.name for m in attn.modifiers] == ["talking_heads"] and attn.proj_l.in_features == 8
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in (attn.qkv.weight, attn.proj_l.weight, attn.proj_w.weight)]
    model.train()
    loss = torch.nn.functional.cross_entropy(model(_x(1, 224)), torch.tensor([3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, (attn.qkv.weight, attn.proj_l.weight,
                                                              attn.proj_w.weight)))


# -- the model contract ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_contract():
    model = vitlab.create_model("maxvit_tiny_tf_224", **TINY).eval()
    x = _x(2, 32)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    torch.testing.assert_close(model.forward_tokens(*model.forward_stem(x)), model.forward_features(x))
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 16)
    with record_attention(model) as rec:
        model(x)
    maps, layouts = rec.last(), rec.last_layouts()
    assert "stages.0.blocks.0.attn_block.attn" in maps and "stages.0.blocks.0.attn_grid.attn" in maps
    assert layouts["stages.0.blocks.0.attn_grid.attn"].grid == (1, 1)  # img 32: windows and grids of 1
    nwd = model.no_weight_decay()
    assert any("relative_position_bias_table" in n for n in nwd) and "head.weight" not in nwd
    assert model.group_matcher()["stem"] == r"^patch_embed"
    assert model.default_cfg["crop_pct"] == model.pretrained_cfg["crop_pct"] == 0.95
    kinds = [e.kind for e in model.forward_halves(x)]
    assert kinds[:4] == ["embed", "downsample", "attn", "mlp"] and kinds.count("conv") == 0
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.head.in_features == 16
    assert model.prune_intermediate_layers([1]) == [1] and len(model.stages) == 1


def _lr_and_wd(model, rename=lambda n: n):
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_layer_decay_and_weight_decay_equal_timm():
    """timm's optimizer factory groups vitlab's MaxViT as timm's: the pre-logits join the classifier's group,
    relative tables and 1-D tensors get no weight decay."""
    from vitlab.interop import to_timm_state_dict

    ours, ref = vitlab.create_model("maxvit_tiny_tf_224", **SMALL), timm.create_model("maxvit_tiny_tf_224", **SMALL)
    rename = dict(zip(ours.state_dict(), to_timm_state_dict(ours))).get
    got, want = _lr_and_wd(ours, rename), _lr_and_wd(ref)
    assert got == want and len({s for s, _ in want.values()}) == 6


# -- vit-pytorch compat ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_vit_pytorch_readme_example():
    from vit_pytorch.max_vit import MaxViT as Reference

    from vitlab.compat.vit_pytorch.max_vit import MaxViT

    args = dict(num_classes=1000, dim_conv_stem=64, dim=96, dim_head=32, depth=(2, 2, 5, 2), window_size=7,
                mbconv_expansion_rate=4, mbconv_shrinkage_rate=0.25, dropout=0.1)
    v = MaxViT(**args).eval()
    img = torch.randn(2, 3, 224, 224)
    preds = v(img)
    assert preds.shape == Reference(**args).eval()(img).shape == (2, 1000)
    # the README's sizes are MaxViT-S (Table 1): the paper's widths and counts, the official weights' shapes
    with torch.device("meta"):
        assert sum(p.numel() for p in v.parameters()) == sum(
            p.numel() for p in timm.create_model("maxvit_small_tf_224").parameters())
    with pytest.raises(ValueError, match="depth"):
        MaxViT(num_classes=10, dim=32, depth=2)
