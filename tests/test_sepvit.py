"""SepViT (Li et al., 2022; timm has none): parameter counts vs the official code's layer list and the paper's
Table, the ``separable`` grouping (depthwise then pointwise attention) and the whole model against explicit
loops over windows and einsums, vitlab's part options and refusals, the model contract, vit-pytorch's class."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention

pytestmark = pytest.mark.usefixtures("one_thread")

# params in millions: the paper's Table (and the official README); the official code's sizes
PAPER_M = {"sepvit_tiny": 31.2, "sepvit_small": 46.6, "sepvit_base": 82.3}
OFFICIAL = {"sepvit_lite": ((32, 64, 128, 256), (1, 2, 6, 2)), "sepvit_tiny": ((96, 192, 384, 768), (1, 2, 6, 2)),
            "sepvit_small": ((96, 192, 384, 768), (1, 2, 14, 2)),
            "sepvit_base": ((128, 256, 512, 1024), (1, 2, 14, 2))}
WINDOWS = ((7,), (7, 14), (7, 14), (7,))  # official ws lists: [7], [7, 14], [7, 14] * k, [7, 7]
# a small SepViT: 8x8 then 4x4 maps; windows 2 (16 and 4 windows), then 4 (one window: no pointwise step)
SMALL = dict(img_size=32, embed_dims=(16, 32), num_heads=(2, 2), depths=(2, 2), mlp_ratios=(2, 2),
             window_size=((2,), (2, 4)), num_classes=10)


def _official_count(dims, depths, windows=WINDOWS, img=224, classes=1000):
    """The official code's parameters, layer by layer (``classification/sepvit.py``): patch embeddings (conv +
    LayerNorm), PEGs (3x3 depthwise conv), blocks (norms, DSA qkv, proj, MLP; with several windows also the window
    tokens, their LayerNorm and PSA_qk), final norm and head."""
    n, prev, side = 0, 3, img // 4
    for i, (c, depth) in enumerate(zip(dims, depths)):
        k, side = (7, side) if i == 0 else (3, side // 2)
        n += prev * c * k * k + c + 2 * c + (9 * c + c)
        for j in range(depth):
            ws = windows[i][j % len(windows[i])]
            nw = (side // ws) ** 2 if side > ws else 1
            n += 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (8 * c * c + 5 * c)
            n += (nw * c + 2 * c + 2 * c * c + 2 * c) if nw > 1 else 0
        prev = c
    return n + 2 * prev + prev * classes + classes


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_param_counts_equal_the_official_code_and_the_paper(name):
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(name).parameters())
    assert n == _official_count(*OFFICIAL[name])
    if name in PAPER_M:  # 31.18 -> 31.2, 46.57 -> 46.6; base: 82.38 M where the paper prints 82.3
        assert abs(n / 1e6 - PAPER_M[name]) < 0.1, n


def _reference_separable(attn, x, grid, ws):
    """Depthwise then pointwise self-attention of ``attn``'s weights, one image and one window at a time."""
    b, _, c = x.shape
    h, d = attn.num_heads, c // attn.num_heads
    wh, ww = min(ws, grid[0]), min(ws, grid[1])
    gh, gw = grid[0] // wh, grid[1] // ww
    nw = gh * gw
    out = torch.empty(b, grid[0], grid[1], c)
    for i in range(b):
        fm, tokens, maps = x[i].view(*grid, c), [], []
        for r in range(gh):
            for s in range(gw):
                t = fm[r * wh:(r + 1) * wh, s * ww:(s + 1) * ww].reshape(-1, c)
                t = torch.cat([attn.win_tokens[r * gw + s], t]) if nw > 1 else t
                q, k, v = F.linear(t, attn.qkv.weight, attn.qkv.bias).view(len(t), 3, h, d).unbind(1)
                a = torch.einsum("nhd,mhd->hnm", q, k).mul(d ** -0.5).softmax(-1)
                o = torch.einsum("hnm,mhd->nhd", a, v).reshape(len(t), c) + t  # the official inner shortcut
                tokens.append(o[0])
                maps.append(o[1:] if nw > 1 else o)
        maps = torch.stack(maps)  # (nW, n, C)
        if nw > 1:
            z = F.gelu(F.layer_norm(torch.stack(tokens), (c,), attn.psa.norm.weight, attn.psa.norm.bias, 1e-5))
            qk = F.linear(z, attn.psa.qk.weight, attn.psa.qk.bias)
            a = torch.einsum("ihd,jhd->hij", qk[:, :c].view(nw, h, d), qk[:, c:].view(nw, h, d)).mul(d ** -0.5)
            maps = torch.einsum("hij,jnhd->inhd", a.softmax(-1), maps.view(nw, -1, h, d)).reshape(maps.shape) + maps
        for w in range(nw):
            r, s = divmod(w, gw)
            out[i, r * wh:(r + 1) * wh, s * ww:(s + 1) * ww] = maps[w].view(wh, ww, c)
    return F.linear(out.view(b, -1, c), attn.proj.weight, attn.proj.bias)


@torch.no_grad()
@pytest.mark.parametrize("grid,ws", [((4, 6), 2), ((6, 6), 3), ((3, 4), 4)])  # 6, 4 windows; one window
def test_separable_attention_against_explicit_loops(grid, ws):
    from parity import randomize_

    layout = TokenLayout(grid)
    m = randomize_(MultiHeadAttention(8, 2, grouping=("separable", dict(window_size=ws)), layout=layout), seed=1).eval()
    x = torch.randn(2, grid[0] * grid[1], 8)
    torch.testing.assert_close(m(x, layout), _reference_separable(m, x, grid, ws), atol=1e-5, rtol=1e-5)
    assert hasattr(m, "psa") == (grid != (3, 4))
    with record_attention(m) as rec:  # the explicit path equals the fused one; both maps recorded
        torch.testing.assert_close(m(x, layout), _reference_separable(m, x, grid, ws), atol=1e-5, rtol=1e-5)
    maps, lays = rec.last(), rec.last_layouts()
    if grid != (3, 4):
        nw = (grid[0] // ws) * (grid[1] // ws)
        assert maps[""].shape == (2 * nw, 2, 1 + ws * ws, 1 + ws * ws) and lays[""] == TokenLayout((ws, ws), 1)
        assert maps["psa"].shape == (2, 2, nw, nw) and lays["psa"].grid == (grid[0] // ws, grid[1] // ws)
        torch.testing.assert_close(maps["psa"].sum(-1), torch.ones(2, 2, nw))


def test_separable_refusals_name_the_part_and_the_reason():
    with pytest.raises(ValueError, match="core 'focused_linear' cannot be combined with grouping 'separable': "
                                         "focused_linear never forms the attention matrix"):
        MultiHeadAttention(8, 2, grouping="separable", core="focused_linear", window_size=2, layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="5x4 map to be a multiple of its 2x2 windows"):
        MultiHeadAttention(8, 2, grouping="separable", window_size=2, layout=TokenLayout((5, 4)))
    with pytest.raises(ValueError, match=r"heads \* head_dim \(12\) must equal dim \(8\)"):
        MultiHeadAttention(8, 2, grouping="separable", window_size=2, head_dim=6, layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="grouping 'separable' cannot place 1 prefix"):
        MultiHeadAttention(8, 2, grouping="separable", window_size=2, layout=TokenLayout((4, 4), 1))
    m = MultiHeadAttention(8, 2, grouping="separable", window_size=2, layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match=r"built for a \(4, 4\) map .* got \(2, 8\)"):
        m(torch.randn(1, 16, 8), TokenLayout((2, 8)))


def _reference_model(model, x, windows):
    """SepViT's forward written out (official code's order): per stage conv + LayerNorm, blocks (pre-norm,
    explicit separable attention, MLP), the PEG after the first block; final LayerNorm, mean, head."""
    def ln(t, norm, eps):
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, eps)

    feats, fm = [], x
    for i, stage in enumerate(model.stages):
        embed = model.patch_embed if i == 0 else stage.downsample
        fm = F.conv2d(fm, embed.proj.weight, embed.proj.bias, stride=embed.stride, padding=embed.padding)
        grid, c = tuple(fm.shape[-2:]), fm.shape[1]
        t = ln(fm.flatten(2).transpose(1, 2), embed.norm, 1e-5)
        for j, blk in enumerate(stage.blocks):
            t = t + _reference_separable(blk.attn, ln(t, blk.norm1, 1e-6), grid, windows[i][j % len(windows[i])])
            hid = F.gelu(F.linear(ln(t, blk.norm2, 1e-6), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
            t = t + F.linear(hid, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
            if j == 0:
                conv = stage.pos_block.proj[0]
                m = t.transpose(1, 2).reshape(-1, c, *grid)
                t = (m + F.conv2d(m, conv.weight, conv.bias, padding=1, groups=c)).flatten(2).transpose(1, 2)
        fm = t.transpose(1, 2).reshape(-1, c, *grid)
        feats.append(fm)
    final = ln(t, model.norm, 1e-6)
    return F.linear(final.mean(1), model.head.weight, model.head.bias), final, feats


@torch.no_grad()
def test_whole_model_and_forward_intermediates_against_the_written_out_forward():
    from parity import randomize_

    model = randomize_(vitlab.create_model("sepvit_tiny", **SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, final, feats = _reference_model(model, x, SMALL["window_size"])
    torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)
    got_final, got = model.forward_intermediates(x)
    torch.testing.assert_close(got_final, final, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [d["reduction"] for d in model.feature_info] == [4, 8] and model.feature_info[1]["num_chs"] == 32


def test_block_pattern_window_tokens_and_paper_windows():
    tiny = vitlab.create_model("sepvit_tiny", num_classes=10)
    nws = [[b.attn.grouping.num_windows for b in s.blocks] for s in tiny.stages]
    assert nws == [[64], [16, 4], [4, 1, 4, 1, 4, 1], [1, 1]]  # 224 px: 56/7, 28/7, 28/14, 14/7, 14/14, 7/7
    keys = tiny.state_dict()
    assert keys["stages.0.blocks.0.attn.win_tokens"].shape == (64, 1, 96)
    assert not torch.any(keys["stages.0.blocks.0.attn.win_tokens"])  # zeros, as the official code
    assert "stages.2.blocks.1.attn.win_tokens" not in keys and "stages.3.blocks.0.attn.psa.qk.weight" not in keys
    with pytest.raises(ValueError, match="takes 224x224 inputs only"):
        tiny(torch.randn(1, 3, 256, 256))


def _attention(model):
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


@pytest.mark.parametrize("kind,value", [("core", "cosine"), ("modifiers", ("talking_heads",)), ("norm", "rms"),
                                        ("featscale", True), ("wiring", "parallel"), ("branch_scale", "layerscale")])
def test_part_options_train(kind, value):
    model = vitlab.create_model("sepvit_tiny", **SMALL, **{kind: value})
    mods = list(model.modules())
    uses = {"core": lambda: all(m.core.name == value for m in _attention(model)),
            "modifiers": lambda: all([p.name for p in m.modifiers] == list(value) for m in _attention(model)),
            "norm": lambda: isinstance(model.stages[0].blocks[0].attn.psa.norm, vitlab.layers.NORMS.get(value)),
            "featscale": lambda: sum(isinstance(m, vitlab.layers.FeatScale) for m in mods) == 4,
            "wiring": lambda: all(getattr(m, "wiring", value) == value for m in mods),
            "branch_scale": lambda: isinstance(model.stages[1].blocks[1].ls2, vitlab.layers.ChannelScale)}
    assert uses[kind](), (kind, value)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mixers_kwargs_and_refusals():
    lin = vitlab.create_model("sepvit_tiny", **SMALL, mixer="focused_linear")
    assert {m.grouping.name for m in _attention(lin)} == {"global"}  # FLatten's rule: no windows, no tokens
    assert not any("win_tokens" in k for k in lin.state_dict())
    pool = vitlab.create_model("sepvit_tiny", **SMALL, mixer="pooling")
    assert not _attention(pool) and pool(torch.randn(1, 3, 64, 64)).shape == (1, 10)  # no tokens: any size
    cos = vitlab.create_model("sepvit_tiny", **SMALL, mixer="cosine", mixer_kwargs=dict(tau=7.0),
                              branch_scale="weighted", shortcut_init=0.25)
    assert cos.stages[0].blocks[0].attn.core.tau == 7.0
    assert float(cos.stages[1].blocks[1].ls2.gamma.detach().flatten()[0]) == 0.25
    with pytest.raises(ValueError, match="'tua'"):
        vitlab.create_model("sepvit_tiny", **SMALL, mixer="cosine", mixer_kwargs=dict(tua=1.0))
    with pytest.raises(ValueError, match="8x8 map to be a multiple of its 3x3 windows"):
        vitlab.create_model("sepvit_tiny", **{**SMALL, "window_size": 3})
    with pytest.raises(ValueError, match="window_size needs one entry per stage"):
        vitlab.create_model("sepvit_tiny", **{**SMALL, "window_size": (2, 2, 2)})
    with pytest.raises(ValueError, match="global_pool must be 'avg', got 'token'"):
        vitlab.create_model("sepvit_tiny", **SMALL, global_pool="token")


def test_contract():
    from timm.optim import create_optimizer_v2

    model = vitlab.create_model("sepvit_tiny", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 16, 32)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in opt.param_groups}) > 3
    assert "stages.0.blocks.0.attn.psa.norm.weight" in model.no_weight_decay()
    assert "stages.0.blocks.0.attn.win_tokens" not in model.no_weight_decay()  # decayed, as the official code
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.pretrained_cfg["num_classes"] == 5
    assert model.pretrained_cfg["architecture"] == "sepvit_tiny" and model.default_cfg["crop_pct"] == 0.9
    plain = [p.clone() for p in torch.autograd.grad(model.eval()(x).sum(), list(model.parameters()))]
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, torch.autograd.grad(model(x).sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# -- vit-pytorch's class, README example with only the import changed -----------------------------------------
README = dict(num_classes=1000, dim=32, dim_head=32, heads=(1, 2, 4, 8), depth=(1, 2, 6, 2), window_size=7,
              dropout=0.1)


def test_vit_pytorch_readme_example_same_output_shape():
    vp = pytest.importorskip("vit_pytorch.sep_vit")
    from vitlab.compat.vit_pytorch.sep_vit import SepViT

    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, ref = SepViT(**README).eval(), vp.SepViT(**README).eval()
        assert ours(img).shape == ref(img).shape == (1, 1000)
    assert [len(s.blocks) for s in ours.stages] == [1, 2, 6, 2]
    assert {b.attn.grouping.window_size for s in ours.stages for b in s.blocks} == {7}  # as given (no 14)
    small = SepViT(**dict(README, num_classes=5, depth=(1, 1), heads=(1, 2)), image_size=56)
    small(torch.randn(2, 3, 56, 56)).sum().backward()
    assert all(p.grad is not None for p in small.parameters())
    with pytest.raises(ValueError, match="dim_head=16 is not supported"):
        SepViT(**dict(README, dim_head=16))
    with pytest.raises(ValueError, match="depth=6 must be a tuple"):
        SepViT(**dict(README, depth=6))
    with pytest.raises(ValueError, match="num_classes=0 is not supported"):
        SepViT(**dict(README, num_classes=0))
