"""RegionViT: parameter counts vs the paper and an independent count of the official code's layers, the
regional-to-local grouping against explicit index lists, both attention steps against an explicit einsum with the
official relative-position loop, the model contract, the part options, and the vit-pytorch class."""
import pytest
import torch

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.models.regionvit import _SIZES

SMALL = dict(img_size=64, embed_dims=(16, 32, 64, 128), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), window_size=2,
             num_classes=10, drop_path_rate=0.0)
TWO = dict(img_size=32, embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 2), window_size=2, num_classes=10)


def _official_count(embed_dims, depths, num_heads, stem, window=7, mlp=4, classes=1000):
    """Parameters of the official RegionViT (IBM/RegionViT regionvit.py), counted layer by layer by hand."""
    c0 = embed_dims[0]
    if stem == "3conv":  # conv 3x3 (C/4), LN2d, conv 3x3 (C/2), LN2d, conv 3x3 (C)
        n = (27 * c0 // 4 + c0 // 4) + c0 // 2 + (c0 // 4 * 9 * c0 // 2 + c0 // 2) + c0 + (c0 // 2 * 9 * c0 + c0)
    else:  # one 8x8 conv
        n = 3 * 64 * c0 + c0
    n += 3 * (4 * window) ** 2 * c0 + c0  # the regional tokens' patchify conv (``cls_token``)
    for i, (c, d, h) in enumerate(zip(embed_dims, depths, num_heads)):
        if i:  # Projection: LN2d(C_in) + depthwise 3x3 conv C_in -> C
            n += 2 * embed_dims[i - 1] + 9 * c + c
        per_block = 3 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + h * (2 * window - 1) ** 2 \
            + (c * mlp * c + mlp * c) + (mlp * c * c + c)
        n += d * per_block
    return n + 2 * embed_dims[-1] + embed_dims[-1] * classes + classes


@pytest.mark.parametrize("size,paper", [("tiny", 13.8), ("small", 30.6), ("medium", 41.2), ("base", 72.7)])
def test_parameter_counts_equal_the_official_layers_and_the_paper_table(size, paper):
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(f"regionvit_{size}").parameters())
    assert n == _official_count(**_SIZES[size])
    assert round(n / 1e6, 1) == paper  # Chen et al., ICLR 2022, Table 1


def _explicit_groups(h, w, window):
    """Index lists into ``[regional tokens; local tokens]``: region (i, j) first, then its window row by row."""
    rw = w // window
    groups = []
    for i in range(h // window):
        for j in range(rw):
            regional = [i * rw + j]
            local = [(h // window) * rw + (i * window + dy) * w + j * window + dx
                     for dy in range(window) for dx in range(window)]
            groups.append(regional + local)
    return torch.tensor(groups)


@pytest.mark.parametrize("hw,window", [((4, 6), 2), ((6, 3), 3)])
def test_regional_grouping_equals_explicit_index_lists(hw, window):
    r = (hw[0] // window) * (hw[1] // window)
    layout = TokenLayout(hw, r)
    attn = MultiHeadAttention(8, 2, grouping=("regional", dict(window_size=window)), layout=layout)
    x = torch.randn(3, layout.num_tokens, 8)
    groups, _, state = attn.grouping.inputs(attn, x, layout)
    idx = _explicit_groups(*hw, window)
    torch.testing.assert_close(groups, x[:, idx].reshape(-1, idx.shape[1], 8), rtol=0, atol=0)
    torch.testing.assert_close(attn.grouping.outputs(attn, groups, state), x, rtol=0, atol=0)


def _official_rel_pos(table, window):
    """The official bias, by its loop: key (dy, dx) of query (y, x) reads offset [dy - y + w//2, dx - x + w//2] of
    the (2w-1) x (2w-1) table, with Python's negative indexing."""
    side = 2 * window - 1
    grid = torch.arange(side * side).reshape(side, side)
    idx = [int(grid[dy - y + window // 2, dx - x + window // 2]) for y in range(window) for x in range(window)
           for dy in range(window) for dx in range(window)]
    return table[:, idx].reshape(table.shape[0], window * window, window * window)


def _softmax_attend(attn, x, bias=None):
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = torch.einsum("bnc,oc->bno", x, attn.qkv.weight).add(attn.qkv.bias).reshape(b, n, 3, h, -1).unbind(2)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * (c // h) ** -0.5
    logits = logits if bias is None else logits + bias
    out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("window", [2, 3])
def test_both_attention_steps_equal_an_explicit_einsum_with_the_official_bias(window):
    torch.manual_seed(0)
    hw, c = (2 * window, 2 * window), 8
    layout = TokenLayout(hw, 4)
    attn = MultiHeadAttention(c, 2, grouping=("regional", dict(window_size=window)), position=("regional_relative",),
                              layout=layout)
    with torch.no_grad():
        attn.rel_pos.normal_()
    x = torch.randn(2, layout.num_tokens, c)
    idx = _explicit_groups(*hw, window)
    groups = x[:, idx].reshape(-1, idx.shape[1], c)
    bias = torch.zeros(2, idx.shape[1], idx.shape[1])
    bias[:, 1:, 1:] = _official_rel_pos(attn.rel_pos.detach(), window)  # the regional token's row and column: 0
    want = torch.zeros_like(x)
    want[:, idx.flatten()] = _softmax_attend(attn, groups, bias).reshape(2, -1, c)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, layout), want, rtol=1e-5, atol=1e-5)
        with record_attention(attn) as rec:
            attn(x, layout)
        assert rec.last()[""].shape == (8, 2, 1 + window ** 2, 1 + window ** 2)
        regions = x[:, :4]  # the regional self-attention: same weights, no bias, all regions together
        torch.testing.assert_close(attn(regions, TokenLayout((2, 2))), _softmax_attend(attn, regions),
                                   rtol=1e-5, atol=1e-5)


def test_regional_block_is_rsa_then_the_one_block():
    torch.manual_seed(0)
    m = vitlab.create_model("regionvit_tiny", **TWO).eval()
    blk, layout = m.layers[0].blocks[0], TokenLayout((8, 8), 16)
    x = torch.randn(2, layout.num_tokens, 16)
    r = x[:, :16] + _softmax_attend(blk.attn, blk.norm0(x[:, :16]))
    y = torch.cat([r, x[:, 16:]], 1)
    y = y + blk.attn(blk.norm1(y), layout)
    y = y + blk.mlp(blk.norm2(y))
    with torch.no_grad():
        torch.testing.assert_close(blk(x, layout), y, rtol=1e-5, atol=1e-5)


def test_model_contract_at_a_small_size():
    torch.manual_seed(0)
    m = vitlab.create_model("regionvit_tiny", **SMALL)
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    out.square().mean().backward()
    assert out.shape == (2, 10) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
        halves = {h.name: h for h in m.forward_halves(x)}
        for i, t in enumerate(inter):  # each tap is the local map after the stage's last block
            last = halves[f"layers.{i}.blocks.{len(m.layers[i].blocks) - 1}.mlp"]
            torch.testing.assert_close(t, last.feature)
        torch.testing.assert_close(m.forward_head(final), m(x))
        r = last.prefix.shape[1]  # one regional token left: the head averages the normalised regional tokens
        torch.testing.assert_close(m(x), m.head(m.norm(last.prefix).mean(1)))
        assert r == 1 and m.feature_info[-1]["reduction"] == 32
        with record_attention(m) as rec:
            m(x)
    # the regional self-attention (R x R) and the regional-to-local groups, per block
    assert [t.shape for t in rec.maps["layers.0.blocks.0.attn"]] == [(2, 2, 64, 64), (128, 2, 5, 5)]
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.default_cfg["num_classes"] == 3 and m.pretrained_cfg is m.default_cfg
    assert "layers.0.blocks.0.attn.rel_pos" not in m.no_weight_decay()
    from timm.models import group_parameters
    groups = group_parameters(m, m.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(m.parameters()))


@pytest.mark.parametrize("parts", [dict(mixer="pooling"), dict(core="cosine", mixer_kwargs=dict(tau=12.0)),
                                   dict(modifiers=("talking_heads",)), dict(norm="rms"), dict(featscale=True),
                                   dict(branch_scale="layerscale", shortcut_init=0.1), dict(wiring="post"),
                                   dict(wiring="parallel")])
def test_part_options(parts):
    m = vitlab.create_model("regionvit_tiny", **TWO, **parts)
    out = m(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in m.parameters())


def test_refusals():
    with pytest.raises(ValueError, match="core 'focused_linear' cannot be combined with position bias "
                                         "'regional_relative'"):
        vitlab.create_model("regionvit_tiny", **TWO, mixer="focused_linear")
    with pytest.raises(ValueError, match="1conv stem needs image sides of at least 2 pixels, got 1x1"):
        vitlab.create_model("regionvit_medium", img_size=1)
    m = vitlab.create_model("regionvit_medium", **TWO)  # sides the windows do not fit: padded (test_regionvit_padding)
    assert m(torch.randn(1, 3, 24, 2)).shape == (1, 10)
    with pytest.raises(ValueError, match="got 1x24"):
        m(torch.randn(1, 3, 1, 24))
    with pytest.raises(ValueError, match="tua"):
        vitlab.create_model("regionvit_tiny", **TWO, mixer="cosine", mixer_kwargs=dict(tua=1))


def test_vit_pytorch_readme_example_with_only_the_import_changed():
    from vit_pytorch.regionvit import RegionViT as Reference

    from vitlab.compat.vit_pytorch.regionvit import RegionViT

    kw = dict(dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), window_size=7, num_classes=1000,
              tokenize_local_3_conv=False, use_peg=False)
    model = RegionViT(**kw)
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pred = model(img)
        assert pred.shape == Reference(**kw)(img).shape == (1, 1000)
    assert [s.blocks[0].attn.num_heads for s in model.layers] == [2, 4, 8, 16]  # 32-wide heads, the paper's
    with pytest.raises(ValueError, match="use_peg=True"):
        RegionViT(use_peg=True)
