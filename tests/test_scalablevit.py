"""ScalableViT (Yang et al., ECCV 2022): SSA and IWSA + LIM against explicit computations, the parameter counts
against a count of what the official code builds (and its README's table), vitlab's part options, the official
key layout, any input size, and vit-pytorch's README example through the compat class.  timm has no ScalableViT."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.models.scalablevit import scalablevit_from_official

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=32, embed_dims=(16, 32, 32, 32), depths=(2, 2, 1, 1), num_heads=(2, 2, 2, 2),
             sr_ratios=(2, 2, 1, 1), wss=(2, 2, 2, 1), num_classes=10, head_hidden=64)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _lin(t, layer):
    return t @ layer.weight.T + layer.bias


def official_layout(state_dict):
    """vitlab keys written out by hand in the official code's layout."""
    official = {}
    for k, v in state_dict.items():
        p = k.split(".")
        if p[0] == "patch_embed":
            k = "patch_embeds.0." + ".".join(p[1:])
        elif p[0] == "stages" and p[2] == "downsample":
            k = f"patch_embeds.{p[1]}." + ".".join(p[3:])
        elif p[0] == "stages" and p[2] == "pos_block":
            k = f"pos_block.{p[1]}." + ".".join(p[3:])
        elif p[0] == "stages":
            k = f"stages.{p[1]}." + ".".join(p[3:])
        official[k] = v
    return official


# -- SSA: spatial reduction + channel scaling, by hand ---------------------------------------------------------
@pytest.mark.parametrize("record", [False, True])
def test_scalable_self_attention_equals_einsum(record):
    (h, w), dim, heads, r, c = (4, 6), 16, 2, 2, 1.5
    attn = _randomize(MultiHeadAttention(dim, heads, projection=("scalable", dict(c_ratio=c)),
                                         grouping=("scalable_reduction", dict(sr_ratio=r, c_ratio=c)),
                                         layout=TokenLayout((h, w)))).eval()
    x = torch.randn(2, h * w, dim)
    fm = x.transpose(1, 2).reshape(2, dim, h, w)
    red = F.conv2d(F.conv2d(fm, attn.reduction[0].weight, attn.reduction[0].bias, stride=r, groups=dim),
                   attn.reduction[1].weight, attn.reduction[1].bias)  # (2, 24, 2, 3): C' = 1.5 C
    t = F.gelu(F.layer_norm(red.flatten(2).transpose(1, 2), (24,), attn.norm_act[0].weight, attn.norm_act[0].bias))
    q = _lin(x, attn.q).view(2, h * w, heads, 12)
    k, v = _lin(t, attn.k).view(2, 6, heads, 12), _lin(t, attn.v).view(2, 6, heads, 8)
    probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * (8 * c) ** -0.5, dim=-1)  # (d * c_ratio)^-1/2
    ref = _lin(torch.einsum("bhij,bjhd->bihd", probs, v).reshape(2, h * w, dim), attn.proj)
    with torch.no_grad():
        if record:
            with record_attention(attn) as rec:
                out = attn(x)
            torch.testing.assert_close(next(iter(rec.last().values())), probs, atol=1e-5, rtol=1e-5)
        else:
            out = attn(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# -- IWSA: windows + the LIM over the whole value map, by hand ----------------------------------------------------
@pytest.mark.parametrize("hw", [(4, 6), (5, 5)])
def test_interactive_window_attention_equals_loops(hw):
    (h, w), dim, heads, ws = hw, 8, 2, 2
    attn = _randomize(MultiHeadAttention(dim, heads, grouping=("window", dict(window_size=ws)), position=("lim",),
                                         layout=TokenLayout(hw))).eval()
    x = torch.randn(2, h * w, dim)
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    xp = F.pad(x.view(2, h, w, dim), (0, 0, 0, wp - w, 0, hp - h)).reshape(2, hp * wp, dim)  # zero padding, as Swin
    qkv = _lin(xp, attn.qkv).view(2, hp * wp, 3, heads, dim // heads)
    out = torch.zeros(2, hp * wp, dim)
    for wy in range(0, hp, ws):
        for wx in range(0, wp, ws):
            idx = [(wy + a) * wp + wx + b for a in range(ws) for b in range(ws)]
            q, k, v = (qkv[:, idx, s] for s in range(3))
            p = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * (dim // heads) ** -0.5, dim=-1)
            out[:, idx] = torch.einsum("bhij,bjhd->bihd", p, v).reshape(2, len(idx), dim)
    out = out.view(2, hp, wp, dim)[:, :h, :w].reshape(2, h * w, dim)
    v_map = _lin(x, attn.qkv)[..., 2 * dim:].transpose(1, 2).reshape(2, dim, h, w)  # V of the unpadded map
    lim = F.conv2d(v_map, attn.lim_func.weight, attn.lim_func.bias, padding=1, groups=dim)
    ref = _lin(out + lim.flatten(2).transpose(1, 2), attn.proj)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lim"):
        MultiHeadAttention(dim, heads, grouping=("dilated", dict(group_size=2)), position=("lim",),
                           layout=TokenLayout(hw))


# -- sizes: what the official code builds, counted by hand; its README's table ------------------------------------
def _official_count(dims, depths, cs, srs=(8, 4, 2, 1), wss=(7, 7, 7, 7), mlp=4, classes=1000, hidden=4096):
    total = 0
    for s, d in enumerate(dims):
        cin, k = (3, 7) if s == 0 else (dims[s - 1], 3)
        total += cin * d * k * k + d + 2 * d + 10 * d  # patch embedding conv + LayerNorm, PEG (3x3 depthwise)
        for i in range(depths[s]):
            total += 4 * d + 2 * mlp * d * d + mlp * d + d + d * d + d  # norms, MLP, proj
            if i % 2 == 0 and wss[s] != 1:
                total += 3 * d * d + 3 * d + 10 * d  # qkv, LIM
            elif srs[s] > 1:
                c = int(d * cs[s])
                total += d * srs[s] ** 2 + d + d * c + c + 2 * c + d * c + c + c * c + c + c * d + d
            else:
                total += 3 * d * d + 3 * d  # q, kv
    return total + 2 * dims[-1] + dims[-1] * hidden + 3 * hidden + hidden * classes + classes


# the official scalable_vit_{small,base,large}: embed_dims, depths, c_ratios (sr 8/4/2/1, windows 7)
OFFICIAL = {"scalablevit_small": ((64, 128, 256, 512), (2, 2, 20, 2), (1.25, 1.25, 1.25, 1)),
            "scalablevit_base": ((96, 192, 384, 768), (2, 2, 14, 6), (2, 1.25, 1.25, 1)),
            "scalablevit_large": ((128, 256, 512, 1024), (2, 6, 12, 4), (0.25, 0.5, 1, 1))}


@pytest.mark.parametrize("name,readme", [("scalablevit_small", 32.4e6), ("scalablevit_base", 81.9e6),
                                         ("scalablevit_large", 104.9e6)])
def test_parameter_counts_equal_the_official_code(name, readme):
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(name).parameters())
    assert n == _official_count(*OFFICIAL[name])
    # the README's table: S 32.4M (the code gives 32.0M), B 81.9M; L 104.9M (the code gives 109.3M)
    assert abs(n - readme) / readme < {"scalablevit_large": 0.045}.get(name, 0.013), n


# -- vitlab's part options, refusals, contract ---------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(mixer="cosine"), dict(core="focused_linear"), dict(mixer="pooling"),
                                  dict(modifiers=("talking_heads",)), dict(norm="center"), dict(featscale=True),
                                  dict(branch_scale="weighted"), dict(wiring="parallel"),
                                  dict(mixer_kwargs=dict(lim_kernel=5))])
def test_part_options_build_and_train(opts):
    m = vitlab.create_model("scalablevit_small", **SMALL, **opts)
    out = m(torch.randn(2, 3, 32, 32))
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None for p in m.parameters())


def test_refusals_are_one_clear_error():
    with pytest.raises(ValueError, match="never forms the attention matrix"):
        vitlab.create_model("scalablevit_small", **SMALL, core="focused_linear", modifiers=("reattention",))
    with pytest.raises(ValueError, match="c_ratioo"):
        vitlab.create_model("scalablevit_small", **SMALL, mixer_kwargs=dict(c_ratioo=2))
    with pytest.raises(ValueError, match="num_heads"):
        vitlab.create_model("scalablevit_small", **dict(SMALL, num_heads=(3, 2, 2, 2), embed_dims=(18, 32, 32, 32),
                                                        c_ratios=(1.25, 1, 1, 1)))


def test_contract_intermediates_recording_and_official_layout():
    m = vitlab.create_model("scalablevit_small", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2), (2, 32, 1, 1)]
    with record_attention(m) as rec:
        y = m(x)
    maps = rec.last()
    assert maps["stages.0.blocks.0.attn"].shape == (2 * 16, 2, 4, 4)  # IWSA: 16 windows of 2x2
    assert maps["stages.0.blocks.1.attn"].shape == (2, 2, 64, 16)  # SSA: 64 queries, 4x4 reduced keys
    assert {"stages.0.pos_block.proj.0.weight", "head.0.bias"} <= m.no_weight_decay()
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    ref = vitlab.create_model("scalablevit_small", **SMALL).eval()
    official = official_layout(ref.state_dict())
    fresh = vitlab.create_model("scalablevit_small", **SMALL).eval()
    fresh.load_state_dict(scalablevit_from_official({"model": official}))
    torch.testing.assert_close(fresh(x), ref(x))


def test_any_input_size_with_dynamic_img_size():
    big = vitlab.create_model("scalablevit_small", **dict(SMALL, img_size=64)).eval()
    dyn = vitlab.create_model("scalablevit_small", **SMALL, dynamic_img_size=True).eval()
    dyn.load_state_dict(big.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), big(x))


def test_vit_pytorch_readme_example():
    from vit_pytorch.scalable_vit import ScalableViT as Reference

    from vitlab.compat.vit_pytorch.scalable_vit import ScalableViT

    kw = dict(num_classes=1000, dim=64, heads=(2, 4, 8, 16), depth=(2, 2, 20, 2), ssa_dim_key=(40, 40, 40, 32),
              reduction_factor=(8, 4, 2, 1), window_size=(64, 32, None, None), dropout=0.1)
    model = ScalableViT(**kw).eval()
    img = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        preds = model(img)
        assert preds.shape == Reference(**kw).eval()(img).shape == (1, 1000)
    ssa = model.stages[0].blocks[1].attn
    assert ssa.grouping.c_ratio == 1.25 and ssa.q.out_features == 80  # ssa_dim_key 40 x 2 heads
    with pytest.raises(ValueError, match="iwsa_dim_key"):
        ScalableViT(**dict(kw, iwsa_dim_key=16))
