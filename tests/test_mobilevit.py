"""MobileViT (Mehta and Rastegari, ICLR 2022): timm parity for every size, parameter counts vs timm and the
paper, the ``unfold`` grouping vs explicit index lists and brute-force attention, the part options, the
model contract against timm, and the vit-pytorch compatible class."""
import math

import pytest
import torch

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.unfold import fold_patches, unfold_patches

timm = pytest.importorskip("timm")

SMALL = dict(img_size=32, stem_chs=8, channels=(8, 16, 16), depths=(1, 1, 1), strides=(1, 2, 2),
             transformer_dims=(0, 16, 32), transformer_depths=(0, 1, 1), num_heads=2, num_features=32, num_classes=10)


@pytest.fixture
def he_scaled_convs(monkeypatch):
    """parity.randomize_ draws every tensor, conv weights with std min(0.2, 1/sqrt(fan_in)): on MobileViT's ~20
    convs without a skip (3x3 depthwise ones have fan-in 9) the image signal fades to 1e-5 in the logits and the
    "logits depend on the image" check fails.  After it, conv weights are redrawn at He scale sqrt(2 / fan_in)."""
    import parity

    draw = parity.randomize_

    def randomize_(model, seed=0):
        draw(model, seed)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
        return model

    monkeypatch.setattr(parity, "randomize_", randomize_)
    return parity


@pytest.mark.parametrize("name, img", [
    ("mobilevit_xxs", 64),   # every map a multiple of the 2x2 patch
    ("mobilevit_xxs", 80),   # 5x5 and 3x3 maps: resized around the transformer
    ("mobilevit_xs", 32),    # last map 1x1: resized to 2x2 and back
    ("mobilevit_s", 32),
])
def test_timm_parity_both_directions(he_scaled_convs, name, img):
    rep = he_scaled_convs.check_parity(name, img_size=img)
    assert len(rep.intermediates) == 6 and not rep.notes  # forward_features + timm's 5 taps, all compared


@pytest.mark.parametrize("name, paper_m", [("mobilevit_xxs", 1.3), ("mobilevit_xs", 2.3), ("mobilevit_s", 5.6)])
def test_param_counts_equal_timm_and_the_paper(name, paper_m):
    with torch.device("meta"):
        ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == ref
    assert round(ours / 1e6, 1) == paper_m  # Table 1 / Fig. 6 of the paper: 1.3M, 2.3M, 5.6M


# -- the unfold grouping -------------------------------------------------------------------------------
def test_unfold_matches_explicit_index_lists_and_fold_inverts_it():
    b, (h, w), (ph, pw), c = 2, (6, 4), (3, 2), 5
    x = torch.randn(b, h * w, c)
    groups = unfold_patches(x, (h, w), (ph, pw))
    nh, nw = h // ph, w // pw
    assert groups.shape == (b * ph * pw, nh * nw, c)
    for bi in range(b):
        for a in range(ph):
            for cc in range(pw):
                rows = [(i * ph + a) * w + (j * pw + cc) for i in range(nh) for j in range(nw)]
                torch.testing.assert_close(groups[bi * ph * pw + a * pw + cc], x[bi, rows], rtol=0, atol=0)
    assert torch.equal(fold_patches(groups, (h, w), (ph, pw)), x)
    g2 = torch.randn_like(groups)
    assert torch.equal(unfold_patches(fold_patches(g2, (h, w), (ph, pw)), (h, w), (ph, pw)), g2)


def test_unfold_refuses_maps_that_are_not_multiples_of_the_patch():
    with pytest.raises(ValueError, match="5x4 map cannot be unfolded into 2x2 patches"):
        unfold_patches(torch.randn(1, 20, 3), (5, 4), (2, 2))
    m = MultiHeadAttention(8, 2, grouping="unfold", patch_size=2)
    with pytest.raises(ValueError, match="without prefix tokens"):
        m(torch.randn(1, 17, 8), TokenLayout((4, 4), 1))


def test_unfold_attention_equals_brute_force_and_records_per_position():
    torch.manual_seed(0)
    (h, w), d, heads = (4, 6), 8, 2
    m = MultiHeadAttention(d, heads, grouping="unfold", patch_size=2).eval()
    x, layout = torch.randn(2, h * w, d), TokenLayout((h, w))
    with record_attention(m) as rec:
        out = m(x, layout)
    q, k, v = m.qkv(x).view(2, h * w, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    pos = torch.arange(h * w)
    same = ((pos[:, None] // w) % 2 == (pos[None] // w) % 2) & ((pos[:, None] % w) % 2 == (pos[None] % w) % 2)
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(d // heads)
    probs = logits.masked_fill(~same, float("-inf")).softmax(-1)
    ref = m.proj(torch.einsum("bhnm,bhmd->bnhd", probs, v).reshape(2, h * w, d))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(m.eval()(x, layout), ref, atol=1e-5)  # the fused (SDPA) path too
    rec_probs, rec_layout = rec.last()[""], rec.last_layouts()[""]
    assert rec_probs.shape == (2 * 4, heads, 6, 6) and rec_layout.grid == (2, 3)
    rows = [(i * 2) * w + j * 2 for i in range(2) for j in range(3)]  # patch position (0, 0) of image 0
    torch.testing.assert_close(rec_probs[0], probs[0][:, rows][:, :, rows], atol=1e-6, rtol=1e-5)


# -- part options and the contract -----------------------------------------------------------------------
def _attn(model):
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


def test_parts_reach_the_transformer_blocks():
    m = vitlab.create_model("mobilevit_xxs", **SMALL)
    assert {a.grouping.name for a in _attn(m)} == {"unfold"}
    lin = vitlab.create_model("mobilevit_xxs", **SMALL, mixer="focused_linear")
    assert {a.grouping.name for a in _attn(lin)} == {"global"}  # FLatten's rule: linear cost, whole map
    pool = vitlab.create_model("mobilevit_xxs", **SMALL, mixer="pooling")
    assert not _attn(pool) and not [n for n in pool.state_dict() if ".attn.qkv" in n]
    rms = vitlab.create_model("mobilevit_xxs", **SMALL, norm="rms", modifiers=("talking_heads",), wiring="post",
                              branch_scale="layerscale", featscale=True)
    blk = rms.stages[2].blocks[0]
    assert isinstance(blk.norm, torch.nn.RMSNorm) and blk.transformer[0].wiring == "post"
    assert [p.name for p in blk.transformer[0].attn.modifiers] == ["talking_heads"]
    with pytest.raises(ValueError, match="patch_size must be positive"):
        vitlab.create_model("mobilevit_xxs", **dict(SMALL, patch_size=0))
    with pytest.raises(ValueError, match="transformer_dims"):
        vitlab.create_model("mobilevit_xxs", **dict(SMALL, transformer_dims=(0, 0, 32)))


def test_forward_intermediates_features_and_pruning_equal_timm():
    from parity import randomize_

    from vitlab.interop import load_timm_weights

    ref = randomize_(timm.create_model("mobilevit_xxs", img_size=64)).eval()
    ours = load_timm_weights(vitlab.create_model("mobilevit_xxs", img_size=64), ref.state_dict()).eval()
    x = torch.randn(1, 3, 64, 64)
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in ours.feature_info] == \
        [(f["num_chs"], f["reduction"], f["module"]) for f in ref.feature_info]
    with torch.no_grad():
        for idx in (None, 2, [0, 4]):
            a, b = ours.forward_intermediates(x, indices=idx), ref.forward_intermediates(x, indices=idx)
            torch.testing.assert_close(a[0], b[0])
            for u, v in zip(a[1], b[1], strict=True):
                torch.testing.assert_close(u, v)
        ours.prune_intermediate_layers(2), ref.prune_intermediate_layers(2)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x))


def test_contract_record_reset_groups_and_checkpointing():
    from timm.models import group_parameters

    m = vitlab.create_model("mobilevit_xxs", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    with record_attention(m) as rec:
        m(x).sum().backward()
    assert set(rec.last()) == {f"stages.{i}.blocks.0.transformer.0.attn" for i in (1, 2)}
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.pretrained_cfg["num_classes"] == 3 and m.default_cfg["mean"] == (0, 0, 0)
    groups = group_parameters(m, m.group_matcher())  # stem, 1 + 2 + 2 blocks (final_conv joins the last), head
    assert len(groups) == 1 + 5 + 1 and all(n.startswith("patch_embed") for n in groups[0])
    assert groups[5][-1].startswith("final_conv") and groups[2][0].startswith("stages.1.downsample")
    assert m.no_weight_decay() == {n for n, p in m.named_parameters() if p.ndim <= 1}
    m.eval()
    want = m(x)
    torch.testing.assert_close(m.forward_tokens(*m.forward_stem(x)), m.forward_features(x))
    m.set_grad_checkpointing()
    torch.testing.assert_close(m(x), want)


def test_layer_decay_and_weight_decay_equal_timm():
    from timm.optim import create_optimizer_v2

    from vitlab.interop import to_timm_state_dict

    def lr_and_wd(model, rename=lambda n: n):
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        names = {id(p): rename(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"]) for g in opt.param_groups
                for p in g["params"]}

    ours, ref = vitlab.create_model("mobilevit_xxs"), timm.create_model("mobilevit_xxs")
    rename = dict(zip(ours.state_dict(), to_timm_state_dict(ours))).get
    got, want = lr_and_wd(ours, rename), lr_and_wd(ref)
    assert got == want and len({s for s, _ in want.values()}) > 10


# -- vit-pytorch's class -----------------------------------------------------------------------------------
def test_vit_pytorch_readme_example_runs_with_only_the_import_changed():
    from vitlab.compat.vit_pytorch.mobile_vit import MobileViT
    from vit_pytorch.mobile_vit import MobileViT as Reference

    kwargs = dict(image_size=(256, 256), dims=[96, 120, 144], channels=[16, 32, 48, 48, 64, 64, 80, 80, 96, 96, 384],
                  num_classes=1000)
    mbvit_xs = MobileViT(**kwargs)
    img = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        pred = mbvit_xs(img)
        assert pred.shape == Reference(**kwargs)(img).shape == (1, 1000)
    with torch.device("meta"):  # vitlab's mobilevit_xs is the README's model, sized as the paper
        assert sum(p.numel() for p in mbvit_xs.parameters()) == sum(
            p.numel() for p in vitlab.create_model("mobilevit_xs").parameters())
    with pytest.raises(ValueError, match="kernel_size=5"):
        MobileViT(**kwargs, kernel_size=5)
    with pytest.raises(ValueError, match="channels"):
        MobileViT(**dict(kwargs, channels=[16, 32, 48, 40, 64, 64, 80, 80, 96, 96, 384]))
