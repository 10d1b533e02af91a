"""ViT-recipe variants (SimpleViT, DeepViT, small-dataset ViT with SPT/LSA, LocalViT) and their parts, each
checked against an independent computation: formulas written out here, brute force, timm, the official
code's parameter structure."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.layers import TokenLayout, record_attention
from vitlab.layers.mlp import LocalityFeedForward
from vitlab.layers.pos_embed import sincos_2d, sincos_2d_big_vision
from vitlab.layers.spt import ShiftedPatchTokenization, shifted_views

timm = pytest.importorskip("timm")


def _count(name, **kw):
    with torch.device("meta"):
        return sum(p.numel() for p in vitlab.create_model(name, **kw).parameters())


def _block(d, hidden, qkv_bias=True, ln=True):
    """Parameters of one pre-norm ViT block: 2 LayerNorms, qkv, proj, fc1, fc2."""
    return 4 * d * ln + 3 * d * d + 3 * d * qkv_bias + d * d + d + 2 * d * hidden + hidden + d


# -- SimpleViT ----------------------------------------------------------------------------------------------
def test_big_vision_sincos_is_the_formula_and_not_maes():
    h, w, d = 3, 5, 16
    want = torch.empty(h * w, d)
    for y in range(h):
        for x in range(w):
            for i in range(d // 4):
                omega = 1.0 / 10000 ** (i / (d // 4 - 1))  # big_vision: denominator d/4 - 1
                want[y * w + x, [i, d // 4 + i, d // 2 + i, 3 * d // 4 + i]] = torch.tensor(
                    [math.sin(x * omega), math.cos(x * omega), math.sin(y * omega), math.cos(y * omega)])
    torch.testing.assert_close(sincos_2d_big_vision((h, w), d), want)
    assert not torch.allclose(sincos_2d((h, w), d), want, atol=1e-3)  # MAE's d/4 denominator differs
    m = vitlab.create_model("simple_vit_tiny_patch16_224", img_size=48, depth=1)
    torch.testing.assert_close(m.pos_embed[0], sincos_2d_big_vision((3, 3), 192))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_big_vision((2, 2), 6)


def test_simple_vit_counts_equal_timm_without_class_token_and_table():
    for size in ("tiny", "small", "base"):
        ref = timm.create_model(f"vit_{size}_patch16_224", class_token=False, global_pool="avg", fc_norm=False,
                                pos_embed="none")
        assert _count(f"simple_vit_{size}_patch16_224") == sum(p.numel() for p in ref.parameters())
    assert _count("simple_vit_small_patch16_224") == 21_974_632  # ViT-S/16 less class token and table: 22 M


def test_simple_vit_equals_timm_with_our_table_and_zero_head():
    from parity import randomize_

    ours = vitlab.create_model("simple_vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7).eval()
    assert ours.head.weight.abs().sum() == 0 and ours.head.bias.abs().sum() == 0  # zero-initialised head
    assert isinstance(ours.fc_norm, nn.Identity) and isinstance(ours.norm, nn.LayerNorm)  # norm before pooling
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7, class_token=False,
                            global_pool="avg", fc_norm=False).eval()
    randomize_(ref, seed=3)
    with torch.no_grad():
        ref.pos_embed.copy_(ours.pos_embed)
    state = {k: v for k, v in ref.state_dict().items() if k != "pos_embed"}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


# -- DeepViT ------------------------------------------------------------------------------------------------
def _deepvit_official_count(d, depth, n_reattn, classes=1000, img=224, patch=16):
    """The official DeepViT code's parameters: CNN stem, class token, table, blocks, re-attention, norm, head."""
    stem = 3 * 64 * 49 + 128 + 64 * 64 * 9 + 128 + 64 * d * (patch // 2) ** 2 + d
    return (stem + d + ((img // patch) ** 2 + 1) * d + depth * _block(d, 3 * d) + n_reattn * (12 * 12 + 12 + 24)
            + 2 * d + d * classes + classes)


@pytest.mark.parametrize("name,d,depth,k", [("deepvit_s", 396, 16, 5), ("deepvit_l", 420, 32, 12)])
def test_deepvit_counts_and_reattention_placement(name, d, depth, k):
    assert _count(name) == _deepvit_official_count(d, depth, k)
    with torch.device("meta"):
        m = vitlab.create_model(name)
    holders = [i for i, b in enumerate(m.blocks) if hasattr(b.attn, "reattn")]
    assert holders == list(range(depth - k, depth))
    scaled = {m.blocks[i].attn.modifiers[0].reattn_scale for i in holders}
    assert scaled == {name == "deepvit_s"}  # transform_scale=True in the official deepvit_S only
    # the last k blocks keep their re-attention when the depth is overridden (negative indices)
    with torch.device("meta"):
        short = vitlab.create_model(name, depth=k + 2)
    assert [i for i, b in enumerate(short.blocks) if hasattr(b.attn, "reattn")] == list(range(2, k + 2))


def test_deepvit_counts_vs_paper():
    # paper (Zhou et al., 2021): DeepViT-S 27 M; the official code's DeepViT-S is 27.31 M (within 1 %)
    assert abs(_count("deepvit_s") / 27e6 - 1) < 0.015


def test_reattention_and_scale_adjustment_equal_the_official_block_written_out():
    torch.manual_seed(0)
    m = vitlab.create_model("deepvit_s", img_size=32, depth=2, embed_dim=24, num_heads=3,
                            block_modifiers={-1: (("reattention", {"reattn_scale": True}),)})
    for mod in m.modules():  # non-trivial BatchNorm statistics and re-attention map
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    blk = m.blocks[1].eval()
    with torch.no_grad():
        blk.attn.reattn.weight.normal_(0, 0.5)
    x = torch.randn(2, 5, 24)
    a, h, hd = 0.5, 3, 8
    ln1 = nn.LayerNorm(24, eps=1e-6)
    ln1.load_state_dict(blk.norm1.state_dict())
    ln2 = nn.LayerNorm(24, eps=1e-6)
    ln2.load_state_dict(blk.norm2.state_dict())
    at = blk.attn
    q, k, v = at.qkv(ln1(x * a)).reshape(2, 5, 3, h, hd).permute(2, 0, 3, 1, 4)
    p = (torch.einsum("bhid,bhjd->bhij", q, k) * hd ** -0.5).softmax(-1)
    p = torch.einsum("gh,bhij->bgij", at.reattn.weight[:, :, 0, 0], p) + at.reattn.bias.view(1, -1, 1, 1)
    bn = at.reattn_norm
    p = (p - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    p = (p * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * hd ** -0.5
    y = at.proj(torch.einsum("bhij,bhjd->bhid", p, v).transpose(1, 2).reshape(2, 5, 24))
    x1 = x + y / a
    want = x1 + blk.mlp(ln2(x1 * a)) / a
    torch.testing.assert_close(blk(x, TokenLayout((2, 2), 1)), want, atol=1e-5, rtol=1e-5)


def test_block_modifiers_errors_and_scale_adjustment_needs_plain_branches():
    with pytest.raises(ValueError, match="block_modifiers index 5 is out of range for depth 2"):
        vitlab.create_model("vit_tiny_patch4_32", depth=2, block_modifiers={5: ("reattention",)})
    with pytest.raises(ValueError, match="scale_adjustment != 1 needs branch_scale='plain'"):
        vitlab.create_model("deepvit_s", img_size=32, depth=5, branch_scale="layerscale")
    with pytest.raises(ValueError, match="scale_adjustment must be > 0"):
        vitlab.create_model("deepvit_s", img_size=32, depth=5, scale_adjustment=0.0)


# -- ViT for small-size datasets: SPT and LSA ---------------------------------------------------------------
def test_spt_five_images_are_the_explicit_diagonal_shifts():
    x = torch.randn(2, 3, 8, 8)
    s = 2
    out = shifted_views(x, (s, s))
    assert out.shape == (2, 15, 8, 8)
    torch.testing.assert_close(out[:, :3], x)
    for n, (dy, dx) in enumerate([(s, s), (s, -s), (-s, s), (-s, -s)]):  # content moved by (dy, dx)
        want = torch.zeros_like(x)
        for i in range(8):
            for j in range(8):
                if 0 <= i - dy < 8 and 0 <= j - dx < 8:
                    want[..., i, j] = x[..., i - dy, j - dx]
        torch.testing.assert_close(out[:, 3 * (n + 1):3 * (n + 2)], want)


def test_spt_tokens_are_layernorm_linear_of_the_flattened_patches():
    torch.manual_seed(0)
    spt = ShiftedPatchTokenization(img_size=8, patch_size=4, in_chans=3, embed_dim=16)
    with torch.no_grad():
        spt.patch_norm.weight.uniform_(0.5, 1.5)
        spt.patch_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    views = shifted_views(x, (2, 2))
    rows = []
    for r in range(2):
        for c in range(2):  # the official (p1 p2 c) order
            rows.append(views[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(0, 2, 3, 1).reshape(2, -1))
    patches = torch.stack(rows, 1)
    want = spt.proj(F.layer_norm(patches, (240,), spt.patch_norm.weight, spt.patch_norm.bias, 1e-5))
    torch.testing.assert_close(spt(x), want)
    assert sum(p.numel() for p in spt.parameters()) == 2 * 240 + 240 * 16 + 16


def _small_data_official_count(classes, spt, lsa, img=32, patch=4, d=192):
    """Lee et al.'s official ViT: (SPT or linear) patch embedding, class token, table, 9 blocks without qkv bias
    (LSA: one temperature per head), LayerNorm + Linear head."""
    embed = (2 * 5 * 3 * patch * patch + 5 * 3 * patch * patch * d + d) if spt else 3 * patch * patch * d + d
    return (embed + d + ((img // patch) ** 2 + 1) * d + 9 * (_block(d, 2 * d, qkv_bias=False) + 12 * lsa)
            + 2 * d + d * classes + classes)


@pytest.mark.parametrize("suffix,spt,lsa", [("", 0, 0), ("_spt", 1, 0), ("_lsa", 0, 1), ("_sl", 1, 1)])
def test_small_data_vit_counts_equal_the_official_code(suffix, spt, lsa):
    assert _count(f"vit_small_data{suffix}_patch4_32") == _small_data_official_count(10, spt, lsa)
    assert _count(f"vit_small_data{suffix}_patch4_32", num_classes=100) == _small_data_official_count(100, spt, lsa)


def test_lsa_masks_the_diagonal_and_learns_a_temperature():
    torch.manual_seed(0)
    m = vitlab.create_model("vit_small_data_sl_patch4_32", img_size=16, depth=2, embed_dim=32, num_heads=4)
    attn = m.blocks[0].attn
    assert attn.lsa_temperature.requires_grad
    torch.testing.assert_close(attn.lsa_temperature.detach(), torch.full((4,), 8 ** -0.5))
    x = torch.randn(2, 3, 16, 16)
    with record_attention(m) as rec:
        m(x).sum().backward()
    assert attn.lsa_temperature.grad is not None and attn.lsa_temperature.grad.abs().sum() > 0
    for probs in rec.last().values():
        assert probs.shape[-1] == probs.shape[-2] == 17
        assert probs.diagonal(dim1=-2, dim2=-1).abs().max() == 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # brute force: softmax of the masked, temperature-scaled q.k (temperature moved off its init)
    with torch.no_grad():
        attn.lsa_temperature.copy_(torch.tensor([0.1, 0.3, 0.7, 1.1]))
    t = torch.randn(2, 17, 32)
    q, k, v = attn.qkv(t).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * attn.lsa_temperature.view(1, -1, 1, 1)
    logits = logits - torch.diag(torch.full((17,), float("inf")))
    want = attn.proj(torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(attn(t, TokenLayout((4, 4), 1)), want, atol=1e-5, rtol=1e-5)


def test_lsa_refused_where_queries_are_not_keys():
    with pytest.raises(ValueError, match="modifier 'lsa' cannot be combined with grouping 'spatial_reduction'"):
        vitlab.create_model("pvt_tiny", img_size=32, depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                            mlp_ratios=(2, 2), sr_ratios=(2, 1), modifiers=("lsa",))
    from vitlab.layers import MultiHeadAttention
    with pytest.raises(ValueError, match="grouping 'class_query'"):
        MultiHeadAttention(16, 2, grouping="class_query", modifiers=("lsa",), layout=TokenLayout((2, 2), 1))
    with pytest.raises(ValueError, match="focused_linear never forms the attention matrix; lsa needs it"):
        vitlab.create_model("vit_tiny_patch4_32", depth=1, core="focused_linear", modifiers=("lsa",))
    # windows: each query is a key of its window, so Swin takes LSA
    m = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 2), window_size=2, num_classes=10, modifiers=("lsa",))
    with record_attention(m) as rec:
        m(torch.randn(1, 3, 32, 32))
    assert all(p.diagonal(dim1=-2, dim2=-1).abs().max() == 0 for p in rec.last().values())


# -- LocalViT -----------------------------------------------------------------------------------------------
def test_localvit_feed_forward_is_the_conv_stack_and_bypasses_prefix_tokens():
    torch.manual_seed(0)
    ff = LocalityFeedForward(8, 16, se_channels=4).eval()
    for mod in ff.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1 + 9, 8)
    fm = x[:, 1:].transpose(1, 2).reshape(2, 8, 3, 3)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = F.hardswish(bn(F.conv2d(fm, ff.conv1.weight), ff.bn1))
    h = F.hardswish(bn(F.conv2d(h, ff.conv_dw.weight, padding=1, groups=16), ff.bn_dw))
    s = F.conv2d(F.relu(F.conv2d(h.mean((2, 3), keepdim=True), ff.se[1].weight, ff.se[1].bias)),
                 ff.se[3].weight, ff.se[3].bias)
    h = h * F.hardsigmoid(s)
    y = bn(F.conv2d(h, ff.conv2.weight), ff.bn2).flatten(2).transpose(1, 2)
    out = ff(x, TokenLayout((3, 3), 1))
    torch.testing.assert_close(out[:, 1:], y)
    assert out[:, 0].abs().max() == 0  # the class token bypasses the feed-forward


def test_localvit_counts_vs_official_code():
    # official LocalViT-T/S (act3 = h-swish + SE of 8 channels, BN, bias-free convs, no LayerNorm before the
    # feed-forward); vitlab's Block keeps its norm2 in front: + 2 * d per block (0.08 %)
    for size, d in (("tiny", 192), ("small", 384)):
        hid = 4 * d
        ffn = d * hid + 2 * hid + 9 * hid + 2 * hid + (hid * 8 + 8 + 8 * hid + hid) + hid * d + 2 * d
        block = 2 * d + 3 * d * d + 3 * d + d * d + d + ffn
        official = 3 * 256 * d + d + d + 197 * d + 12 * block + 2 * d + d * 1000 + 1000
        assert _count(f"localvit_{size}") == official + 12 * 2 * d


# -- the model contract on every variant ----------------------------------------------------------------------
SMALL = {
    "simple_vit_small_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
    "deepvit_s": dict(img_size=32, patch_size=8, depth=6, embed_dim=36, num_heads=3),
    "deepvit_l": dict(img_size=32, patch_size=8, depth=13, embed_dim=24, num_heads=3),
    "vit_small_data_sl_patch4_32": dict(depth=2, embed_dim=32, num_heads=4),
    "vit_small_data_sl_patch8_64": dict(img_size=32, depth=2, embed_dim=32, num_heads=4),
    "localvit_tiny": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
}


def test_every_variant_is_registered_in_the_table():
    names = set(vitlab.list_models("*"))
    assert {n for n in names if n.startswith(("simple_vit", "deepvit", "vit_small_data", "localvit"))} >= set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_contract(name):
    torch.manual_seed(0)
    m = vitlab.create_model(name, num_classes=5, **SMALL[name])
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    final, inter = m.forward_intermediates(x, indices=1)
    assert len(inter) == 1 and inter[0].shape[:2] == (2, m.embed_dim)
    with record_attention(m) as rec:
        m(x)
    assert len(rec.last()) == len(m.blocks)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    assert m.default_cfg["architecture"] == name and m.pretrained_cfg["num_classes"] == 3
    assert "blocks" in m.group_matcher() and m.no_weight_decay()
