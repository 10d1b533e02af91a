"""LookupViT: the bidirectional cross-attention against an explicit einsum (both directions from the same logits),
the block against its explicit composition, parameter counts against an independent count, the model contract,
the part options and the vit-pytorch class."""
import pytest
import torch

import vitlab
from vitlab.layers import TokenLayout, record_attention
from vitlab.layers.bidirectional import BidirectionalCrossAttention

SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, compressed_size=3, num_classes=10)


def _heads(t, h):
    return t.reshape(*t.shape[:2], h, -1)


def test_bidirectional_cross_attention_equals_an_explicit_einsum_with_one_set_of_logits():
    torch.manual_seed(0)
    att = BidirectionalCrossAttention(16, 2).eval()
    xp, xl = torch.randn(2, 5, 16), torch.randn(2, 12, 16)
    q, k, v = _heads(att.q(xp), 2), _heads(att.k(xl), 2), _heads(att.v(xl), 2)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * 8 ** -0.5  # (B, h, M, N)
    gather = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).reshape(2, 5, 16) @ att.proj.weight.T
    vr = _heads(att.v_rev(xp), 2)
    back = torch.einsum("bhji,bjhd->bihd", logits.softmax(-2), vr).reshape(2, 12, 16) @ att.proj_rev.weight.T
    with torch.no_grad(), record_attention(att) as rec:
        got, shared = att.gather(xp, xl)
        torch.testing.assert_close(got, gather + att.proj.bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.propagate(xp, shared), back + att.proj_rev.bias, rtol=1e-5, atol=1e-5)
    p1, p2 = rec.maps[""]  # (B, h, M, N) rows over lookup tokens, (B, h, N, M) rows over compressed tokens
    assert p1.shape == (2, 2, 5, 12) and p2.shape == (2, 2, 12, 5)
    # one set of logits: log p1 - log p2^T = (log-normaliser of each column) - (of each row), separable
    d = p1.log() - p2.transpose(-2, -1).log()
    torch.testing.assert_close(d, d[..., :1] + d[..., :1, :] - d[..., :1, :1], rtol=1e-4, atol=1e-4)


def test_lookup_block_is_gather_block_propagate_mlp():
    torch.manual_seed(0)
    m = vitlab.create_model("lookupvit_base_patch16_224", **SMALL).eval()
    blk, layout = m.blocks[0], TokenLayout((8, 8), 9)
    x = torch.randn(2, 73, 32)
    xp, xl = x[:, :9], x[:, 9:]
    g, logits = blk.cross.gather(blk.norm_p(xp), blk.norm_l(xl))
    xp = xp + g
    xp = xp + blk.block.attn(blk.block.norm1(xp), TokenLayout((3, 3)))
    xp = xp + blk.block.mlp(blk.block.norm2(xp))
    xl = xl + blk.cross.propagate(blk.norm_rev(xp), logits)
    xl = xl + blk.mlp(blk.norm_mlp(xl))
    with torch.no_grad():
        torch.testing.assert_close(blk(x, layout), torch.cat([xp, xl], 1), rtol=1e-5, atol=1e-5)


def _count(d=768, depth=12, mlp=4, lookup_mlp=1, patch=16, grid=14, classes=1000):
    """By hand: ViT-B/16's compressed-token blocks plus, per block, MHBC (q, k, v, proj, v_rev, proj_rev), four
    LayerNorms and the lookup MLP; the patch stem, the lookup position table, the final norm and the head."""
    vit_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * mlp * d * d + mlp * d + d)
    lookup = 6 * (d * d + d) + 4 * 2 * d + (2 * lookup_mlp * d * d + lookup_mlp * d + d)
    stem = 3 * patch * patch * d + d + grid * grid * d
    return stem + depth * (vit_block + lookup) + 2 * d + d * classes + classes


def test_parameter_count_equals_an_independent_count():
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model("lookupvit_base_patch16_224").parameters())
        vit_b = sum(p.numel() for p in vitlab.create_model("vit_base_patch16_224").parameters())
    assert n == _count() == 143_336_680
    extra = 12 * (6 * (768 * 768 + 768) + 4 * 2 * 768 + 2 * 768 * 768 + 2 * 768)  # MHBC, 4 norms, lookup MLP
    assert n - vit_b == extra - 2 * 768  # and no class token, 196 position rows instead of 197


@pytest.mark.parametrize("cfg", [dict(), dict(dim=256, depth=3, heads=4, cross_attn_heads=4, mlp_factor=2,
                                          highres_mlp_factor=1, patch_conv_kernel_size=3)])
def test_parameter_count_reconciles_with_vit_pytorch_layer_by_layer(cfg):
    """No official LookupViT code is public (no scenic / big_vision project), so the independent implementation is
    vit-pytorch's ``look_vit.LookViT``: every weight matrix matches (stem conv, the compressed Block, MHBC's q, k, v,
    out and the propagation's v, out, the lookup MLP, the unused-by-it position table); what differs is only what
    ``vitlab.compat.vit_pytorch.look_vit.LookViT``'s docstring lists."""
    from vit_pytorch.look_vit import LookViT as Reference

    from vitlab.compat.vit_pytorch.look_vit import LookViT

    kw = {**dict(image_size=256, num_classes=1000, dim=512, depth=2, heads=8, dim_head=64, patch_size=32,
                 highres_patch_size=8, highres_mlp_factor=2, cross_attn_heads=8, cross_attn_dim_head=64), **cfg}
    with torch.device("meta"):
        ours = sum(p.numel() for p in LookViT(**kw).parameters())
        ref = sum(p.numel() for p in Reference(**kw).parameters())
    d = kw["dim"]
    # per block: 6 LayerNorms with bias (12d) vs its 7 gamma-only ones (7d), plus Linear biases (qkv 3d, proj d,
    # MHBC q, k, v, v_rev 4d, proj, proj_rev 2d) it leaves out; its stem LayerNorm (d); our head bias
    assert ours - ref == kw["depth"] * (12 * d - 7 * d + 10 * d) - d + kw["num_classes"]


def test_model_contract_at_a_small_size():
    torch.manual_seed(0)
    m = vitlab.create_model("lookupvit_base_patch16_224", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    out.square().mean().backward()
    assert out.shape == (2, 10) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        halves = [h for h in m.forward_halves(x) if h.kind == "mlp"]
        assert [t.shape for t in inter] == [(2, 32, 8, 8)] * 2
        for t, h in zip(inter, halves):
            torch.testing.assert_close(t, h.feature)
        torch.testing.assert_close(m(x), m.head(m.norm(halves[-1].prefix).mean(1)))
        with record_attention(m) as rec:
            m(x)
    assert [t.shape for t in rec.maps["blocks.0.cross"]] == [(2, 2, 9, 64), (2, 2, 64, 9)]
    assert rec.maps["blocks.0.block.attn"][0].shape == (2, 2, 9, 9)
    m.reset_classifier(4)
    assert m(x).shape == (2, 4) and m.default_cfg["num_classes"] == 4
    from timm.models import group_parameters
    assert sum(len(g) for g in group_parameters(m, m.group_matcher()).values()) == len(list(m.parameters()))
    assert "pos_embed" in m.no_weight_decay()


@pytest.mark.parametrize("parts", [dict(mixer="pooling"), dict(core="focused_linear"), dict(core="cosine"),
                                   dict(modifiers=("talking_heads",)), dict(norm="rms"), dict(featscale=True),
                                   dict(branch_scale="layerscale", shortcut_init=0.1), dict(wiring="post"),
                                   dict(wiring="parallel"), dict(mixer="cosine", mixer_kwargs=dict(tau=5.0))])
def test_part_options(parts):
    m = vitlab.create_model("lookupvit_base_patch16_224", **SMALL, **parts)
    out = m(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in m.parameters())


def test_refusals():
    with pytest.raises(ValueError, match="tua"):
        vitlab.create_model("lookupvit_base_patch16_224", **SMALL, mixer="cosine", mixer_kwargs=dict(tua=1))
    with pytest.raises(ValueError, match="patch_kernel must be odd"):
        vitlab.create_model("lookupvit_base_patch16_224", **SMALL, patch_kernel=2)


def test_vit_pytorch_example_with_only_the_import_changed():
    from vit_pytorch.look_vit import LookViT as Reference

    from vitlab.compat.vit_pytorch.look_vit import LookViT

    kw = dict(image_size=256, num_classes=1000, dim=512, depth=2, heads=8, dim_head=64, patch_size=32,
              highres_patch_size=8, highres_mlp_factor=2, cross_attn_heads=8, cross_attn_dim_head=64, dropout=0.1)
    v = LookViT(**kw).eval()
    img = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert v(img).shape == Reference(**kw).eval()(img).shape == (2, 1000)
    assert v.compressed_grid == (8, 8) and v.grid_size == (32, 32)
    with pytest.raises(ValueError, match="cross_attn_heads=4"):
        LookViT(**{**kw, "cross_attn_heads": 4, "cross_attn_dim_head": 128})
