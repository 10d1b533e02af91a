"""Twins (Chu et al., NeurIPS 2021): parameter counts vs timm and the paper's tables, timm parity for every
size (every parameter randomised) and forward_intermediates, the PEG and the zero-padded LSA windows
against explicit computations, vitlab's part options and the model contract."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from parity import meta_count
from vitlab.layers import PEG, MultiHeadAttention, TokenLayout, record_attention

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

# params in millions: Twins paper, Table 1 (PCPVT) and Table 2 (SVT)
PAPER_M = {"twins_pcpvt_small": 24.1, "twins_pcpvt_base": 43.8, "twins_pcpvt_large": 60.9,
           "twins_svt_small": 24.0, "twins_svt_base": 56.0, "twins_svt_large": 99.2}
# a small SVT: 2 stages of 2 blocks (LSA then GSA), windows 2, reduction 2 then 1
SMALL = dict(img_size=32, depths=(2, 2), embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1),
             wss=(2, 2), num_classes=10)


@pytest.mark.parametrize("name", sorted(PAPER_M))
def test_param_counts_equal_timm_and_the_paper(name):
    n = meta_count(vitlab.create_model, name)
    assert n == meta_count(timm.create_model, name)
    assert abs(n / 1e6 - PAPER_M[name]) < 0.1, n  # the paper rounds (60.99 M -> 60.9, 99.27 M -> 99.2)


# every timm size at small depths and input; SVT also with its 7x7 windows on maps they do not tile
PARITY = [("twins_pcpvt_small", dict(img_size=32, depths=(1, 2, 1, 1))),
          ("twins_pcpvt_base", dict(img_size=64, depths=(2, 1, 1, 2))),
          ("twins_pcpvt_large", dict(img_size=32, depths=(1, 1, 2, 1))),
          ("twins_svt_small", dict(img_size=64, depths=(2, 1, 3, 1))),  # 16, 8, 4, 2 maps padded to 7x7 windows
          ("twins_svt_base", dict(img_size=64, depths=(2, 2, 1, 2), wss=(2, 2, 2, 2))),  # windows tile the maps
          ("twins_svt_large", dict(img_size=32, depths=(2, 1, 2, 1), wss=(3, 3, 3, 3)))]


@pytest.mark.parametrize("name,kw", PARITY, ids=[n for n, _ in PARITY])
def test_timm_parity_both_directions(name, kw):
    from parity import check_parity

    rep = check_parity(name, **kw)
    assert len(rep.intermediates) == 1 + 4  # forward_features and the 4 stage maps, all matched


@torch.no_grad()
def test_forward_intermediates_equal_timm():
    from parity import timm_pair

    ref, ours = timm_pair("twins_svt_small", img_size=64, depths=(2, 1, 2, 1), wss=(2, 2, 2, 2))
    x = torch.randn(2, 3, 64, 64)
    for kw in (dict(), dict(indices=[1, 3]), dict(indices=2, norm=True), dict(indices=None, norm=True)):
        want = ref.forward_intermediates(x, **kw)
        got = ours.forward_intermediates(x, **kw)
        for a, b in zip([got[0]] + got[1], [want[0]] + want[1]):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4, kw
    assert [d["reduction"] for d in ours.feature_info] == [4, 8, 16, 32]


def test_peg_against_an_explicit_neighbourhood_sum():
    torch.manual_seed(0)
    peg = PEG(4)
    nn.init.normal_(peg.proj[0].bias)
    x = torch.randn(2, 1 + 3 * 5, 4)  # a class token + a 3x5 map
    out = peg(x, TokenLayout((3, 5), 1))
    w, b = peg.proj[0].weight[:, 0], peg.proj[0].bias  # (C, 3, 3), (C,)
    fm = x[:, 1:].reshape(2, 3, 5, 4)  # raster order: (B, H, W, C)
    want = torch.empty_like(fm)
    for i in range(3):
        for j in range(5):
            acc = b.expand(2, 4).clone()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < 3 and 0 <= j + dj < 5:  # zero padding
                        acc = acc + w[:, di + 1, dj + 1] * fm[:, i + di, j + dj]
            want[:, i, j] = fm[:, i, j] + acc  # the generator adds to the tokens it read
    torch.testing.assert_close(out[:, 1:], want.reshape(2, 15, 4), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :1], x[:, :1])  # the class token passes unchanged
    strided = PEG(4, stride=2)(x[:, 1:], TokenLayout((3, 5)))
    assert strided.shape == (2, 2 * 3, 4)  # no residual: the map shrinks
    with pytest.raises(ValueError, match="odd kernel_size"):
        PEG(4, kernel_size=2)


@torch.no_grad()
@pytest.mark.parametrize("grid", [(4, 5), (2, 2)])  # padded to 6x6; a map smaller than the window
def test_lsa_windows_are_zero_padded_as_the_official_code(grid):
    torch.manual_seed(0)
    ws, c, heads = 3, 8, 2
    layout = TokenLayout(grid)
    m = MultiHeadAttention(c, heads, grouping=("window", dict(window_size=ws, fit_map=False)), layout=layout).eval()
    nn.init.normal_(m.qkv.bias)  # padded tokens are zeros *before* the projection: their keys are the bias
    x = torch.randn(2, grid[0] * grid[1], c)
    h, w = grid
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    fm = F.pad(x.view(2, h, w, c), (0, 0, 0, wp - w, 0, hp - h))
    out = torch.zeros(2, hp, wp, c)
    for i in range(0, hp, ws):
        for j in range(0, wp, ws):
            t = fm[:, i:i + ws, j:j + ws].reshape(2, ws * ws, c)
            q, k, v = m.qkv(t).view(2, ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            a = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
            out[:, i:i + ws, j:j + ws] = torch.einsum("bhnm,bhmd->bnhd", a, v).reshape(2, ws, ws, c)
    want = m.proj(out[:, :h, :w].reshape(2, h * w, c))
    torch.testing.assert_close(m(x, layout), want, atol=1e-5, rtol=1e-5)
    shrunk = MultiHeadAttention(c, heads, grouping=("window", dict(window_size=ws)), layout=layout).eval()
    shrunk.load_state_dict(m.state_dict())
    if grid == (2, 2):  # Swin's rule shrinks the window to the map: no padded keys, another result
        assert float((shrunk(x, layout) - want).abs().max()) > 1e-3


def _attn_kinds(model):
    return [[(b.attn.grouping.name, b.attn.projection.name) for b in s.blocks] for s in model.stages]


def test_block_pattern_and_peg_placement():
    svt = vitlab.create_model("twins_svt_small", **{**SMALL, "depths": (3, 1)})
    assert _attn_kinds(svt) == [[("window", "linear"), ("spatial_reduction", "q_kv"), ("window", "linear")],
                                [("window", "linear")]]
    pc = vitlab.create_model("twins_pcpvt_small", img_size=32, depths=(2, 1, 1, 1))
    assert {k for s in _attn_kinds(pc) for k in s} == {("spatial_reduction", "q_kv")}
    assert [s.blocks[0].attn.sr.stride for s in pc.stages[:3]] == [(8, 8), (4, 4), (2, 2)]
    assert pc.stages[3].blocks[0].attn.sr is None  # sr_ratio 1: keys from every token
    kinds = [(e.name, e.kind) for e in svt.eval().forward_halves(torch.randn(1, 3, 32, 32))]
    assert kinds[:5] == [("patch_embed", "embed"), ("stages.0.blocks.0.attn", "attn"), ("stages.0.blocks.0.mlp", "mlp"),
                         ("stages.0.pos_block", "position"), ("stages.0.blocks.1.attn", "attn")]
    assert ("stages.1.pos_block", "position") in kinds
    none = vitlab.create_model("twins_svt_small", **SMALL, pos_code=None)
    assert not any("pos_block" in k for k in none.state_dict())


def _uses(model, kind, value):
    mods = list(model.modules())
    if kind == "core":
        return all(m.core.name == value for m in mods if isinstance(m, MultiHeadAttention))
    if kind == "modifiers":
        return all(value[0] in [p.name for p in m.modifiers] for m in mods if isinstance(m, MultiHeadAttention))
    if kind == "norm":
        return isinstance(model.norm, vitlab.layers.NORMS.get(value))
    if kind == "featscale":
        return sum(isinstance(m, vitlab.layers.FeatScale) for m in mods) == 4
    if kind == "wiring":
        return all(getattr(m, "wiring", value) == value for m in mods)
    return isinstance(model.stages[0].blocks[0].ls1, vitlab.layers.ChannelScale)


@pytest.mark.parametrize("kind,value", [("core", "cosine"), ("modifiers", ("talking_heads",)), ("norm", "rms"),
                                        ("featscale", True), ("wiring", "parallel"), ("branch_scale", "layerscale")])
def test_part_options_train(kind, value):
    model = vitlab.create_model("twins_svt_small", **SMALL, **{kind: value})
    assert _uses(model, kind, value), (kind, value)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mixers_kwargs_and_refusals():
    lin = vitlab.create_model("twins_svt_small", **SMALL, mixer="focused_linear")
    assert {m.grouping.name for m in lin.modules() if isinstance(m, MultiHeadAttention)} == {"global"}
    pool = vitlab.create_model("twins_pcpvt_small", **{**SMALL, "wss": None}, mixer="pooling")
    assert not any(isinstance(m, MultiHeadAttention) for m in pool.modules())
    cos = vitlab.create_model("twins_svt_small", **SMALL, mixer="cosine", mixer_kwargs=dict(tau=7.0),
                              branch_scale="weighted", shortcut_init=0.25)
    assert cos.stages[0].blocks[0].attn.core.tau == 7.0
    assert float(cos.stages[1].blocks[1].ls2.gamma.detach().flatten()[0]) == 0.25
    with pytest.raises(ValueError, match="modifier 'lsa' cannot be combined with grouping 'spatial_reduction'"):
        vitlab.create_model("twins_svt_small", **SMALL, modifiers=("lsa",))
    with pytest.raises(ValueError, match="'tua'"):
        vitlab.create_model("twins_svt_small", **SMALL, mixer="cosine", mixer_kwargs=dict(tua=1.0))
    with pytest.raises(ValueError, match="global_pool must be 'avg', got 'token'"):
        vitlab.create_model("twins_svt_small", **SMALL, global_pool="token")
    with pytest.raises(ValueError, match="img_size 36 must be divisible by 8"):
        vitlab.create_model("twins_svt_small", **{**SMALL, "img_size": 36})
    with pytest.raises(ValueError, match="wss needs 2 values"):
        vitlab.create_model("twins_svt_small", **{**SMALL, "wss": (7, 7, 7)})
    with pytest.raises(ValueError, match="position code 'pgc'"):
        vitlab.create_model("twins_svt_small", **SMALL, pos_code="pgc")


@torch.no_grad()
def test_attention_records_carry_windows_and_reduced_keys():
    model = vitlab.create_model("twins_svt_small", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with record_attention(model) as rec:
        y = model(x)
    torch.testing.assert_close(y, model(x), atol=1e-5, rtol=1e-5)  # the explicit path equals the fused one
    maps, lay = rec.last(), rec.last_layouts()
    assert maps["stages.0.blocks.0.attn"].shape == (2 * 16, 1, 4, 4) and lay["stages.0.blocks.0.attn"].grid == (2, 2)
    assert maps["stages.0.blocks.1.attn"].shape == (2, 1, 64, 16) and lay["stages.0.blocks.1.attn"].grid == (4, 4)
    assert maps["stages.1.blocks.1.attn"].shape == (2, 2, 16, 16)


def test_contract_against_timm():
    from timm.optim import create_optimizer_v2

    from vitlab.interop import to_timm_state_dict

    kw = dict(img_size=32, depths=(2, 1, 2, 1), num_classes=10)
    ours, ref = vitlab.create_model("twins_svt_small", **kw), timm.create_model("twins_svt_small", **kw)
    rename = dict(zip(ours.state_dict(), to_timm_state_dict(ours)))

    def groups(model, name=lambda n: n):
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        names = {id(p): name(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"])
                for g in opt.param_groups for p in g["params"]}

    got, want = groups(ours, rename.get), groups(ref)
    assert got == want and len({s for s, _ in want.values()}) > 4  # layer decay and PEG weights without decay
    assert {n for n in ours.no_weight_decay() if "pos_block" in n} == {f"stages.{i}.pos_block.proj.0.{t}"
                                                                        for i in range(4) for t in ("weight", "bias")}
    x = torch.randn(2, 3, 32, 32)
    assert ours.forward_features(x).shape == (2, 1, 512)  # timm's: tokens of the last stage
    ours.reset_classifier(5)
    assert ours(x).shape == (2, 5) and ours.pretrained_cfg["num_classes"] == 5
    assert ours.pretrained_cfg["architecture"] == "twins_svt_small" and ours.default_cfg["crop_pct"] == 0.9
    with pytest.raises(ValueError, match="global_pool"):
        ours.reset_classifier(3, global_pool="token")


def test_grad_checkpointing_same_gradients():
    model = vitlab.create_model("twins_svt_small", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
