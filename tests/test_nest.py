"""NesT (Zhang et al., AAAI 2022): parameter counts vs timm and the paper, timm parity for every registered
name (every parameter randomised) and for other level counts, forward_intermediates, the block aggregation,
the per-block position tables and the block-local attention against explicit computations, vitlab's part
options and the model contract."""
import pytest
import torch
from torch import nn

import vitlab
from parity import meta_count
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.pos_embed import resample_pos_embed
from vitlab.models.nest import BlockAggregation, blocks_to_raster, raster_to_blocks

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"nest_{s}{jx}" for s in ("tiny", "small", "base") for jx in ("", "_jx")]
PAPER_M = {"tiny": 17, "small": 38, "base": 68}  # Zhang et al., 2022, Table 2 (millions, rounded)
# two levels: an 8x8 patch map cut into 4 blocks of 4x4, then one 4x4 block
SMALL = dict(img_size=32, embed_dims=(16, 32), num_heads=(2, 2), depths=(1, 2), num_classes=10)


@pytest.mark.parametrize("name", NAMES)
def test_param_counts_equal_timm_and_the_paper(name):
    n = meta_count(vitlab.create_model, name)
    assert n == meta_count(timm.create_model, name)
    assert round(n / 1e6) == PAPER_M[name.split("_")[1]], n


@pytest.mark.parametrize("name", NAMES)
def test_timm_parity_both_directions(name):
    from parity import check_parity

    # timm's recipes take no size overrides but img_size and mlp_ratio: full depth, a 32x32 input (8, 4, 2 maps)
    rep = check_parity(name, img_size=32, mlp_ratio=1.0 if "tiny" not in name else 4.0)
    assert len(rep.intermediates) == 1 + 3  # forward_features and the 3 level maps, all matched


def _pair(img_size=32, **kw):
    """(randomised timm ``Nest`` built with ``kw``, vitlab's NesT loaded from it), eval mode."""
    from parity import randomize_

    from vitlab.interop import load_timm_weights

    ref = randomize_(timm.models.nest.Nest(img_size=img_size, **kw)).eval()
    ours = vitlab.create_model("nest_tiny", img_size=img_size, **kw)
    return ref, load_timm_weights(ours, ref.state_dict()).eval()


@torch.no_grad()
@pytest.mark.parametrize("kw", [dict(num_levels=2, embed_dims=(16, 32), num_heads=(2, 4), depths=(1, 2), img_size=64),
                                dict(num_levels=4, embed_dims=(8, 16, 16, 32), num_heads=(1, 2, 2, 4),
                                     depths=(1, 1, 1, 1), img_size=64, patch_size=2, pad_type="same")],
                         ids=["2levels", "4levels_same"])
def test_timm_parity_other_level_counts(kw):
    from parity import compare

    from vitlab.interop import to_timm_state_dict

    ref, ours = _pair(num_classes=10, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    rep = compare(ref, ours, x)
    assert rep.logits < 1e-4 and max(rep.intermediates) < 1e-4 and len(rep.intermediates) == 1 + kw["num_levels"]
    back = timm.models.nest.Nest(num_classes=10, **kw).eval()
    back.load_state_dict(to_timm_state_dict(ours))
    torch.testing.assert_close(back(x), ref(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_intermediates_equal_timm():
    ref, ours = _pair(embed_dims=(16, 32, 32), num_heads=(2, 2, 4), depths=(1, 1, 2), num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    for kw in (dict(), dict(indices=[0, 2]), dict(indices=1, norm=True), dict(indices=None, norm=True),
               dict(indices=[1], stop_early=True)):
        want, got = ref.forward_intermediates(x, **kw), ours.forward_intermediates(x, **kw)
        for a, b in zip([got[0]] + got[1], [want[0]] + want[1]):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4, kw
    assert ours.feature_info == ref.feature_info


@torch.no_grad()
def test_jx_padding_is_not_the_symmetric_one():
    """The jx models' SAME max-pool changes the result: loading nest_tiny_jx weights into nest_tiny must not
    reproduce timm's nest_tiny_jx (else the parity test could not tell the two paddings apart)."""
    from parity import randomize_

    from vitlab.interop import load_timm_weights

    kw = dict(img_size=32, mlp_ratio=1.0)
    ref = randomize_(timm.create_model("nest_tiny_jx", **kw)).eval()
    ours = load_timm_weights(vitlab.create_model("nest_tiny", **kw), ref.state_dict()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert float((ours(x) - ref(x)).abs().max()) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("pad_type", ["", "same"])
def test_block_aggregation_against_explicit_loops(pad_type):
    torch.manual_seed(0)
    agg = BlockAggregation(3, 4, pad_type=pad_type)
    nn.init.normal_(agg.conv.bias), nn.init.normal_(agg.norm.weight), nn.init.normal_(agg.norm.bias)
    x = torch.randn(2, 3, 6, 8)  # an even, non-square map
    tokens, hw = agg(x.flatten(2).transpose(1, 2), TokenLayout((6, 8)))
    assert hw == (3, 4)
    w, b = agg.conv.weight, agg.conv.bias
    conv = torch.empty(2, 4, 6, 8)
    for i in range(6):
        for j in range(8):
            acc = b.expand(2, 4).clone()
            for di in range(3):
                for dj in range(3):
                    r, c = i + di - 1, j + dj - 1
                    if 0 <= r < 6 and 0 <= c < 8:  # zero padding of one
                        acc = acc + x[:, :, r, c] @ w[:, :, di, dj].T
            conv[:, :, i, j] = acc
    mu, var = conv.mean(1, keepdim=True), conv.var(1, unbiased=False, keepdim=True)
    normed = (conv - mu) / torch.sqrt(var + 1e-6) * agg.norm.weight.view(1, 4, 1, 1) + agg.norm.bias.view(1, 4, 1, 1)
    start = 0 if pad_type == "same" else -1  # SAME: the window starts at 2i (the pad goes after); else at 2i - 1
    want = torch.empty(2, 4, 3, 4)
    for i in range(3):
        for j in range(4):
            rows = [r for r in range(2 * i + start, 2 * i + start + 3) if 0 <= r < 6]
            cols = [c for c in range(2 * j + start, 2 * j + start + 3) if 0 <= c < 8]
            want[:, :, i, j] = normed[:, :, rows][:, :, :, cols].amax(dim=(-2, -1))
    torch.testing.assert_close(tokens, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pad_type must be one of"):
        BlockAggregation(3, 4, pad_type="valid")


def test_block_tables_against_explicit_index_lists():
    g, s, c = 3, 2, 5  # 9 blocks of 2x2 on a 6x6 map
    side = g * s
    raster = torch.randn(1, side * side, c)
    blocks = raster_to_blocks(raster, s)
    assert blocks.shape == (1, g * g, s * s, c)
    for gy in range(g):
        for gx in range(g):
            for ty in range(s):
                for tx in range(s):
                    row, col = gy * s + ty, gx * s + tx
                    assert torch.equal(blocks[0, gy * g + gx, ty * s + tx], raster[0, row * side + col])
    assert torch.equal(blocks_to_raster(blocks), raster)
    with pytest.raises(ValueError, match="square number of blocks"):
        blocks_to_raster(torch.randn(1, 3, 4, c))


@torch.no_grad()
def test_attention_stays_inside_each_image_block():
    model = vitlab.create_model("nest_tiny", **SMALL).eval()
    m = model.levels[0].blocks[0].attn
    nn.init.normal_(m.qkv.bias)
    x = torch.randn(2, 64, 16)  # the 8x8 map of level 0, blocks of 4x4
    heads, d = m.num_heads, 16 // m.num_heads
    out = torch.empty(2, 64, 16)
    for gy in range(2):
        for gx in range(2):
            idx = [(gy * 4 + ty) * 8 + gx * 4 + tx for ty in range(4) for tx in range(4)]
            q, k, v = m.qkv(x[:, idx]).view(2, 16, 3, heads, d).permute(2, 0, 3, 1, 4)
            a = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(d ** -0.5).softmax(-1)
            out[:, idx] = torch.einsum("bhnm,bhmd->bnhd", a, v).reshape(2, 16, 16)
    torch.testing.assert_close(m(x, TokenLayout((8, 8))), m.proj(out), atol=1e-5, rtol=1e-5)
    assert model.levels[1].blocks[0].attn.grouping.window == (4, 4)  # the last level: one block


def test_position_table_of_another_size_is_resized():
    ref, _ = _pair(embed_dims=(16, 32, 32), num_heads=(2, 2, 4), depths=(1, 1, 1), num_classes=10)
    from vitlab.interop import load_timm_weights

    big = load_timm_weights(vitlab.create_model("nest_tiny", img_size=64, embed_dims=(16, 32, 32),
                                                num_heads=(2, 2, 4), depths=(1, 1, 1), num_classes=10),
                            ref.state_dict())
    t = ref.levels[0].pos_embed.detach()  # (1, 16 blocks, 2x2 tokens, C) on an 8x8 map
    raster = torch.stack([t[0, (r // 2) * 4 + c // 2, (r % 2) * 2 + c % 2] for r in range(8) for c in range(8)])[None]
    want = resample_pos_embed(raster, (16, 16), (8, 8), 0)
    torch.testing.assert_close(big.levels[0].pos_embed.detach(), want)


def _uses(model, kind, value):
    mods = list(model.modules())
    attns = [m for m in mods if isinstance(m, MultiHeadAttention)]
    if kind == "core":
        return attns and all(m.core.name == value for m in attns)
    if kind == "modifiers":
        return attns and all(value[0] in [p.name for p in m.modifiers] for m in attns)
    if kind == "norm":
        return isinstance(model.norm, vitlab.layers.NORMS.get(value)) and isinstance(
            model.levels[1].downsample.norm, vitlab.layers.NORMS.get(value))
    if kind == "featscale":
        return sum(isinstance(m, vitlab.layers.FeatScale) for m in mods) == 3
    if kind == "wiring":
        return all(b.wiring == value for lv in model.levels for b in lv.blocks)
    return isinstance(model.levels[0].blocks[0].ls1, vitlab.layers.ChannelScale)


@pytest.mark.parametrize("kind,value", [("core", "cosine"), ("modifiers", ("talking_heads",)), ("norm", "rms"),
                                        ("featscale", True), ("wiring", "parallel"), ("branch_scale", "layerscale")])
def test_part_options_train(kind, value):
    model = vitlab.create_model("nest_tiny", **SMALL, **{kind: value})
    assert _uses(model, kind, value), (kind, value)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mixers_kwargs_and_refusals():
    lin = vitlab.create_model("nest_tiny", **SMALL, mixer="focused_linear")
    assert {m.grouping.name for m in lin.modules() if isinstance(m, MultiHeadAttention)} == {"global"}
    pool = vitlab.create_model("nest_tiny", **SMALL, mixer="pooling")
    assert not any(isinstance(m, MultiHeadAttention) for m in pool.modules())
    cos = vitlab.create_model("nest_tiny", **SMALL, mixer="cosine", mixer_kwargs=dict(tau=7.0),
                              branch_scale="weighted", shortcut_init=0.25)
    assert cos.levels[0].blocks[0].attn.core.tau == 7.0
    assert float(cos.levels[1].blocks[1].ls2.gamma.detach().flatten()[0]) == 0.25
    with pytest.raises(ValueError, match="'tua'"):
        vitlab.create_model("nest_tiny", **SMALL, mixer="cosine", mixer_kwargs=dict(tua=1.0))
    with pytest.raises(ValueError, match="global_pool must be 'avg', got 'token'"):
        vitlab.create_model("nest_tiny", **SMALL, global_pool="token")
    with pytest.raises(ValueError, match="img_size 34 must be divisible by patch_size 4"):
        vitlab.create_model("nest_tiny", **{**SMALL, "img_size": 34})
    with pytest.raises(ValueError, match="10x10 patch map, which 3 levels cannot cut"):
        vitlab.create_model("nest_tiny", img_size=40, depths=(1, 1, 1))
    with pytest.raises(ValueError, match="num_heads needs 2 values"):
        vitlab.create_model("nest_tiny", **{**SMALL, "num_heads": (2, 2, 2)})
    with pytest.raises(ValueError, match="square images"):
        vitlab.create_model("nest_tiny", **{**SMALL, "img_size": (32, 64)})
    with pytest.raises(ValueError, match="input image size 64x64 does not match"):
        vitlab.create_model("nest_tiny", **SMALL)(torch.randn(1, 3, 64, 64))


@torch.no_grad()
def test_attention_records_carry_the_image_blocks():
    model = vitlab.create_model("nest_tiny", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with record_attention(model) as rec:
        y = model(x)
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)  # the explicit path equals the fused one
    maps, lay = rec.last(), rec.last_layouts()
    assert maps["levels.0.blocks.0.attn"].shape == (2 * 4, 2, 16, 16) and lay["levels.0.blocks.0.attn"].grid == (4, 4)
    assert maps["levels.1.blocks.1.attn"].shape == (2, 2, 16, 16)
    torch.testing.assert_close(maps["levels.0.blocks.0.attn"].sum(-1), torch.ones(8, 2, 16))


def test_contract_against_timm():
    from timm.optim import create_optimizer_v2

    from vitlab.interop import to_timm_state_dict

    kw = dict(img_size=32, embed_dims=(16, 32, 32), num_heads=(2, 2, 4), depths=(1, 2, 2), num_classes=10)
    ours, ref = vitlab.create_model("nest_tiny", **kw), timm.models.nest.Nest(**kw)
    rename = dict(zip(ours.state_dict(), to_timm_state_dict(ours)))

    def groups(model, name=lambda n: n):
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        names = {id(p): name(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"])
                for g in opt.param_groups for p in g["params"]}

    got, want = groups(ours, rename.get), groups(ref)
    assert got == want and len({s for s, _ in want.values()}) > 4  # layer decay; no decay on the tables
    assert {n for n in ours.no_weight_decay() if n.endswith("pos_embed")} == ref.no_weight_decay()
    x = torch.randn(2, 3, 32, 32)
    assert ours.forward_features(x).shape == (2, 32, 2, 2)  # timm's: the normalised last map
    ours.reset_classifier(5)
    assert ours(x).shape == (2, 5) and ours.pretrained_cfg["num_classes"] == 5
    assert ours.pretrained_cfg["architecture"] == "nest_tiny" and ours.default_cfg["fixed_input_size"]
    with pytest.raises(ValueError, match="global_pool"):
        ours.reset_classifier(3, global_pool="token")


def test_drop_path_follows_the_official_configs():
    def rates(model):
        return [float(getattr(b.drop_path1, "drop_prob", 0.0)) for lv in model.levels
                for b in getattr(lv, "blocks", getattr(lv, "transformer_encoder", ()))]

    official = {"tiny": 0.2, "small": 0.3, "base": 0.5}  # stochastic_depth_drop of the official configs
    with torch.device("meta"):
        for size, rate in official.items():
            ours = rates(vitlab.create_model(f"nest_{size}"))
            assert ours == pytest.approx(rates(timm.create_model(f"nest_{size}", drop_path_rate=rate)))
            assert ours[0] == 0.0 and ours[-1] == pytest.approx(rate)


def test_grad_checkpointing_same_gradients():
    model = vitlab.create_model("nest_tiny", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
