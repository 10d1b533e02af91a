"""CrossFormer (Wang et al., ICLR 2022): its new parts against explicit computations (dilated groups by index
lists, the dynamic position bias by a loop over offsets, whole attention calls by brute force, the cross-scale
embedding by separate convs), the paper's parameter counts, vitlab's part options, the official key layout,
any input size, and vit-pytorch's README example through the compat class.  timm has no CrossFormer."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.cross_embed import CrossScaleEmbed
from vitlab.layers.dilated import dilated_geometry
from vitlab.models.crossformer import crossformer_from_official

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=32, embed_dim=16, depths=(2, 2, 1, 1), num_heads=(2, 2, 2, 2), group_size=2, num_classes=10)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def official_layout(state_dict):
    """vitlab keys written out by hand in the official code's layout: the downsampler closing stage i,
    "reductions" instead of "projs", and an index buffer the official code saves."""
    official = {}
    for k, v in state_dict.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            k = ".".join(["layers", str(int(parts[1]) - 1), "downsample", parts[3].replace("projs", "reductions")]
                         + parts[4:])
        official[k] = v
    official["layers.0.blocks.0.attn.biases"] = torch.zeros(9, 2)
    return official


# -- the dilated grouping: explicit index lists ----------------------------------------------------------
@pytest.mark.parametrize("hw,g", [((6, 6), 3), ((4, 6), 2), ((3, 5), 7), ((5, 7), 2)])
def test_dilated_groups_are_the_papers_index_lists(hw, g):
    h, w = hw
    attn = MultiHeadAttention(4, 1, grouping=("dilated", dict(group_size=g)), layout=TokenLayout(hw))
    pos = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)
    groups, _, state = attn.grouping.inputs(attn, pos, TokenLayout(hw))
    (gh, gw), (ih, iw) = dilated_geometry(hw, g)
    assert (gh, gw) == (min(h, g), min(w, g)) and (ih, iw) == (-(-h // gh), -(-w // gw))
    for i in range(ih):
        for j in range(iw):  # group (i, j): tokens (a * I + i, b * I + j), raster order of (a, b); padding -> 0
            expect = [(a * ih + i) * w + (b * iw + j) if a * ih + i < h and b * iw + j < w else 0.0
                      for a in range(gh) for b in range(gw)]
            assert groups[i * iw + j, :, 0].tolist() == expect
    back = attn.grouping.outputs(attn, groups, state)
    torch.testing.assert_close(back, pos)


# -- the dynamic position bias: a loop over offsets --------------------------------------------------------
def test_dynamic_position_bias_is_the_mlp_of_each_offset():
    attn = _randomize(MultiHeadAttention(32, 4, grouping=("window", dict(window_size=3)), position=("dynamic",),
                                         layout=TokenLayout((6, 6))))
    assert attn.pos.pos_proj.out_features == 2  # dim // 16, the official width
    from vitlab.layers.grouping import Branch

    q = torch.zeros(1, 4, 9, 8)
    bias = attn.positions[0].bias(attn, Branch(q, q, q, slice(0, 4), (3, 3)))
    cells = [(a, b) for a in range(3) for b in range(3)]
    for qi, (qa, qb) in enumerate(cells):
        for ki, (ka, kb) in enumerate(cells):
            expect = attn.pos(torch.tensor([[qa - ka, qb - kb]], dtype=torch.float32))[0]
            torch.testing.assert_close(bias[0, :, qi, ki], expect)
    attn.pos.residual = True  # the official residual form: proj, + pos1, + pos2, pos3
    bias = attn.positions[0].bias(attn, Branch(q, q, q, slice(0, 4), (3, 3)))
    p = attn.pos
    x = p.pos_proj(torch.tensor([[1.0, -2.0]]))
    x = x + p.pos1(x)
    torch.testing.assert_close(bias[0, :, cells.index((1, 0)), cells.index((0, 2))], p.pos3(x + p.pos2(x))[0])


# -- whole attention calls: brute force over the groups -----------------------------------------------------
def _brute_force(attn, x, hw, index_lists):
    """Softmax attention of each group (an explicit index list), qkv / proj of ``attn``, DPB by offsets."""
    b, n, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).view(b, n, 3, heads, d)
    out = torch.zeros(b, n, c)
    for idx, coords in index_lists:
        q, k, v = (qkv[:, idx, s].transpose(1, 2) for s in range(3))  # (b, heads, g, d)
        offs = torch.tensor([[ya - yb, xa - xb] for ya, xa in coords for yb, xb in coords], dtype=torch.float32)
        bias = attn.pos(offs).T.reshape(heads, len(idx), len(idx))
        probs = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * d ** -0.5 + bias, dim=-1)
        out[:, idx] = torch.einsum("bhij,bhjd->bhid", probs, v).transpose(1, 2).reshape(b, len(idx), c)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("kind", ["sda", "lda"])
def test_short_and_long_distance_attention_equal_brute_force(kind):
    (h, w), g = (6, 6), 3
    grouping = ("window", dict(window_size=g)) if kind == "sda" else ("dilated", dict(group_size=g))
    attn = _randomize(MultiHeadAttention(16, 2, grouping=grouping, position=("dynamic",),
                                         layout=TokenLayout((h, w)))).eval()
    interval = h // g
    lists = []
    for gi in range(interval):
        for gj in range(interval):
            if kind == "sda":  # window (gi, gj): rows gi*G .. gi*G+G-1
                coords = [(gi * g + a, gj * g + b) for a in range(g) for b in range(g)]
            else:  # dilated group (gi, gj): rows a * I + gi (the paper's LDA)
                coords = [(a * interval + gi, b * interval + gj) for a in range(g) for b in range(g)]
            lists.append(([y * w + x_ for y, x_ in coords], [(a, b) for a in range(g) for b in range(g)]))
    x = torch.randn(2, h * w, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, TokenLayout((h, w))), _brute_force(attn, x, (h, w), lists),
                                   atol=1e-5, rtol=1e-5)


# -- the cross-scale embedding: separate convs ----------------------------------------------------------------
def test_cross_scale_embedding_concatenates_convs_of_every_kernel():
    stem = _randomize(CrossScaleEmbed(3, 64, (16, 4, 32, 8), 4))
    assert [c.out_channels for c in stem.projs] == [32, 16, 8, 8]  # the paper's split, ascending kernels
    img = torch.randn(2, 3, 32, 32)
    maps = [F.conv2d(img, c.weight, c.bias, stride=4, padding=(k - 4) // 2) for c, k in zip(stem.projs, (4, 8, 16, 32))]
    ref = torch.cat(maps, 1).flatten(2).transpose(1, 2)
    tokens, hw = stem(img)
    assert hw == (8, 8)
    torch.testing.assert_close(tokens, F.layer_norm(ref, (64,), stem.norm.weight, stem.norm.bias))
    merge = _randomize(CrossScaleEmbed(64, 128, (2, 4), 2, norm_first=True))
    fm = F.layer_norm(tokens, (64,), merge.norm.weight, merge.norm.bias).transpose(1, 2).reshape(2, 64, 8, 8)
    ref = torch.cat([F.conv2d(fm, c.weight, c.bias, stride=2, padding=(k - 2) // 2)
                     for c, k in zip(merge.projs, (2, 4))], 1)
    out, hw = merge(tokens, TokenLayout((8, 8)))
    assert hw == (4, 4) and [c.out_channels for c in merge.projs] == [64, 64]
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="kernels"):
        CrossScaleEmbed(3, 64, (4, 7), 4)


# -- sizes: the paper's Table (27.8M / 30.7M / 52.0M / 92.0M) ----------------------------------------------
@pytest.mark.parametrize("name,paper", [("crossformer_tiny", 27.8e6), ("crossformer_small", 30.7e6),
                                        ("crossformer_base", 52.0e6), ("crossformer_large", 92.0e6)])
def test_parameter_counts_equal_the_paper(name, paper):
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(name).parameters())
    assert abs(n - paper) < 0.05e6, n  # the paper rounds to 0.1M


# -- vitlab's part options, refusals, contract ---------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(mixer="cosine"), dict(core="focused_linear"), dict(mixer="pooling"),
                                  dict(modifiers=("talking_heads",)), dict(norm="rms"), dict(branch_scale="layerscale",
                                                                                             shortcut_init=0.1),
                                  dict(featscale=True), dict(wiring="post"), dict(mixer_kwargs=dict(dpb_dim=4))])
def test_part_options_build_and_train(opts):
    m = vitlab.create_model("crossformer_tiny", **SMALL, **opts)
    out = m(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in m.parameters())
    if opts.get("mixer") == "pooling":
        assert not any(".pos." in n for n, _ in m.named_parameters())  # no attention parts for a pooling mixer


def test_refusals_are_one_clear_error():
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        vitlab.create_model("crossformer_tiny", **SMALL, core="focused_linear", modifiers=("talking_heads",))
    with pytest.raises(ValueError, match="dpb_dimm"):
        vitlab.create_model("crossformer_tiny", **SMALL, mixer_kwargs=dict(dpb_dimm=4))
    with pytest.raises(ValueError, match="img_size"):
        vitlab.create_model("crossformer_tiny", **SMALL)(torch.randn(1, 3, 64, 64))


def test_contract_intermediates_recording_and_official_layout():
    m = vitlab.create_model("crossformer_tiny", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2), (2, 128, 1, 1)]
    with record_attention(m) as rec:
        y = m(x)
    maps = rec.last()
    assert maps["layers.0.blocks.0.attn"].shape == (2 * 16, 2, 4, 4)  # SDA: 16 windows of 2x2
    assert maps["layers.0.blocks.1.attn"].shape == (2 * 16, 2, 4, 4)  # LDA: 16 dilated groups of 2x2
    torch.testing.assert_close(y, m(x))
    assert m.group_matcher()["blocks"] and "head.bias" in m.no_weight_decay()
    official = official_layout(m.state_dict())
    fresh = vitlab.create_model("crossformer_tiny", **SMALL).eval()
    fresh.load_state_dict(crossformer_from_official(official))
    torch.testing.assert_close(fresh(x), y)


def test_any_input_size_with_dynamic_img_size():
    big = vitlab.create_model("crossformer_tiny", **dict(SMALL, img_size=64)).eval()
    dyn = vitlab.create_model("crossformer_tiny", **SMALL, dynamic_img_size=True).eval()
    dyn.load_state_dict(big.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), big(x))
        assert dyn(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_vit_pytorch_readme_example():
    from vit_pytorch.crossformer import CrossFormer as Reference

    from vitlab.compat.vit_pytorch.crossformer import CrossFormer

    kw = dict(num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
              local_window_size=7)
    model = CrossFormer(**kw).eval()
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pred = model(img)
        assert pred.shape == Reference(**kw).eval()(img).shape == (1, 1000)
    assert model.depths == (4, 4, 16, 4) and [s.blocks[0].attn.num_heads for s in model.layers] == [2, 4, 8, 16]
    assert model.layers[0].blocks[1].attn.grouping.group_size == 8  # vit-pytorch's global window: the LDA group
    with pytest.raises(ValueError, match="cross_embed_strides"):
        CrossFormer(cross_embed_strides=(4, 2, 2, 1))
