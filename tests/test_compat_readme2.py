"""vit-pytorch's README classes, part 2: ``ats_vit.ViT``, ``simple_vit_3d.SimpleViT``, ``cct_3d.CCT`` and
``na_vit_nested_tensor.NaViT`` in ``vitlab.compat.vit_pytorch``, in the house style of
``tests/test_compat_vit_pytorch.py``: each README config built side by side with vit-pytorch's class, output shapes
compared and parameter counts compared exactly (the difference written out from the two architectures); then real
tensors at a small size, against independent computations (vit-pytorch's own tokenizer and sin-cos code, a model
whose blocks are the identity to read back which patches ATS kept, vit-pytorch's own choice of sampling layers)."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

vit_pytorch = pytest.importorskip("vit_pytorch")

from parity import randomize_  # noqa: E402
from test_compat_vit_pytorch import check_small_contract  # noqa: E402
from vitlab.layers import record_attention  # noqa: E402


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _classes(mod: str, cls: str):
    return (getattr(importlib.import_module(f"vit_pytorch.{mod}"), cls),
            getattr(importlib.import_module(f"vitlab.compat.vit_pytorch.{mod}"), cls))


def _pair(mod: str, cls: str, kw, vp_device: str = "meta"):
    vp_cls, vl_cls = _classes(mod, cls)
    with torch.device(vp_device):
        ref = vp_cls(**kw).eval()
    with torch.device("meta"):
        ours = vl_cls(**kw).eval()
    return ref, ours


def _meta_forward(model: nn.Module, shape, **kw):
    with torch.device("meta"):
        return model(torch.empty(shape), **kw)


def _vit_delta(dim, depth, heads, patch_dim, dim_head=64, proj_bias=False):
    """vitlab minus vit-pytorch: qkv biases (+ output-projection biases), no LayerNorms around the patch map."""
    return depth * (3 * heads * dim_head + dim * proj_bias) - (2 * patch_dim + 2 * dim)


ATS = dict(image_size=256, patch_size=16, num_classes=1000, dim=1024, depth=6,
           max_tokens_per_depth=(256, 128, 64, 32, 16, 8), heads=16, mlp_dim=2048, dropout=0.1, emb_dropout=0.1)
VIDEO = dict(image_size=128, frames=16, image_patch_size=16, frame_patch_size=2, num_classes=1000, dim=1024,
             depth=6, heads=8, mlp_dim=2048)
CCT3 = dict(img_size=224, num_frames=8, embedding_dim=384, n_conv_layers=2, frame_kernel_size=3, kernel_size=7,
            stride=2, padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=14,
            num_heads=6, mlp_ratio=3., num_classes=1000, positional_embedding="learnable")
NAVIT = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048,
             dropout=0., emb_dropout=0., token_dropout_prob=0.1)


# -- the README configs: shapes and exact parameter counts ----------------------------------------------------------
def test_readme_ats_vit():
    ref, ours = _pair("ats_vit", "ViT", ATS)
    assert _count(ours) - _count(ref) == _vit_delta(1024, 6, 16, 3 * 16 * 16)  # ATS itself has no parameters
    # 256 patches: block 0's bound 256 never binds, blocks 1-5 sample (vit-pytorch: "if tokens > bound")
    assert sorted(ours.in_block) == [1, 2, 3, 4, 5] and [s.num_tokens for s in ours.ats] == [128, 64, 32, 16, 8]
    preds, ids = _meta_forward(ours, (4, 3, 256, 256), return_sampled_token_ids=True)
    assert preds.shape == (4, 1000) and ids.shape == (4, 8)  # README: (4, 1000), (4, <= 8)
    assert _meta_forward(ours, (4, 3, 256, 256)).shape == (4, 1000)  # vit-pytorch's torch.unique has no meta kernel


def test_readme_simple_vit_3d():
    ref, ours = _pair("simple_vit_3d", "SimpleViT", VIDEO)
    assert _meta_forward(ours, (4, 3, 16, 128, 128)).shape == _meta_forward(ref, (4, 3, 16, 128, 128)).shape
    assert _count(ours) - _count(ref) == _vit_delta(1024, 6, 8, 3 * 16 * 16 * 2, proj_bias=True)
    assert ours.cls_token is None and not isinstance(ours.pos_embed, nn.Parameter)  # fixed table, a buffer


def test_readme_cct_3d_counts_equal():
    ref, ours = _pair("cct_3d", "CCT", CCT3, vp_device="cpu")  # vit-pytorch's CCT runs its tokenizer while building
    assert _count(ours) == _count(ref)  # the same parts: tokenizer, blocks, norm, sequence pooling, head
    assert ours.pos_embed.shape == ref.classifier.positional_emb.shape == (1, 8 * 14 * 14, 384)
    assert _meta_forward(ours, (1, 3, 8, 224, 224)).shape == (1, 1000)
    assert ours.default_cfg["input_size"] == (3, 8, 224, 224)


def test_readme_navit_nested_tensor():
    with torch.device("meta"):
        ref, ours = (c(**NAVIT) for c in _classes("na_vit_nested_tensor", "NaViT"))
    d, m, c, inner, hd, pd = 1024, 2048, 1000, 16 * 64, 64, 3 * 32 * 32
    # per block: LayerNorm biases (2d), qkv biases, qk-norm biases (2 hd), output-projection bias (d)
    block = 2 * d + 3 * inner + 2 * hd + d
    ours_pool = d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + (2 * d * m + m + d) + (d * c + c)
    ref_pool = d + (d + 3 * d * inner + 2 * hd + inner * d) + d + d * c  # query, attention, bias-free LN and head
    assert _count(ours) - _count(ref) == 6 * block - (2 * pd + 2 * d) + d + ours_pool - ref_pool
    torch.manual_seed(0)
    ref, ours = (c(**NAVIT).eval() for c in _classes("na_vit_nested_tensor", "NaViT"))
    images = [torch.randn(3, 256, 256), torch.randn(3, 128, 128), torch.randn(3, 128, 256),
              torch.randn(3, 256, 128), torch.randn(3, 64, 256)]
    with torch.no_grad():
        assert ours(images).shape == ref(images).shape == (5, 1000)


# -- ATS ---------------------------------------------------------------------------------------------------------
SMALL = dict(image_size=32, patch_size=4, num_classes=5, dim=32, heads=2, dim_head=16, mlp_dim=48)


@pytest.mark.parametrize("bounds", [(16, 12, 12, 3), (40, 16, 9, 9), (64, 64, 64, 64)])
def test_ats_samples_in_the_blocks_vit_pytorch_samples_in(bounds):
    """vit-pytorch's own forward tells which of its layers sampled; vitlab puts its samplers there."""
    vp_cls, vl_cls = _classes("ats_vit", "ViT")
    kw = dict(SMALL, patch_size=8, depth=len(bounds), max_tokens_per_depth=bounds)  # 16 patches
    ref, ours = vp_cls(**kw).eval(), vl_cls(**kw)
    sampled = []
    for i, (attn, _) in enumerate(ref.transformer.layers):
        attn.register_forward_hook(lambda m, a, out, i=i: sampled.append(i) if out[2] is not None else None)
    with torch.no_grad():
        ref(torch.randn(2, 3, 32, 32))
    assert sorted(ours.in_block) == sampled
    assert [s.num_tokens for s in getattr(ours, "ats", ())] == [bounds[i] for i in sampled]


@torch.no_grad()
def test_ats_token_ids_are_the_patches_kept():
    """Blocks made the identity (output projections zero) carry the stem tokens through unchanged while ATS still
    scores and samples them, so the final tokens must be the stem's patch tokens at the returned ids."""
    from vitlab.compat.vit_pytorch.ats_vit import ViT

    model = randomize_(ViT(**SMALL, depth=3, max_tokens_per_depth=(64, 40, 20)), seed=3).double().eval()
    for blk in model.blocks:
        blk.attn.qkv.weight[:32].mul_(6.0)  # peaked class-token queries: repeats, so images keep different counts
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.zero_(), lin.bias.zero_()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    logits, ids = model(x, return_sampled_token_ids=True)
    torch.testing.assert_close(logits, model(x))
    stem = model.forward_stem(x)[0][:, 1:]  # (B, 64, C) patch tokens, row-major
    final = model.forward_features(x)[:, 1:]
    valid = ids >= 0
    assert ids.shape[1] <= 20 and (~valid).any() and valid.any(-1).all()  # padding: images kept different numbers
    for b in range(5):
        kept = ids[b][valid[b]]
        assert torch.equal(kept, kept.unique()) and (ids[b][~valid[b]] == -1).all()  # ascending, padding at the end
        assert valid[b, :len(kept)].all()
        torch.testing.assert_close(final[b, :len(kept)], model.norm(stem[b, kept]), rtol=0, atol=1e-10)


def test_ats_arguments_vitlab_cannot_honour_raise():
    from vitlab.compat.vit_pytorch.ats_vit import ViT

    for bounds, match in (((8, 4), "one bound per block"), ((4, 8, 2), "non-increasing"), ((4, 2, 0), ">= 1")):
        with pytest.raises(ValueError, match=match):
            ViT(**SMALL, depth=3, max_tokens_per_depth=bounds)
    with pytest.raises(ValueError, match="num_classes=0"):
        ViT(**dict(SMALL, num_classes=0), depth=1, max_tokens_per_depth=(4,))


# -- 3-D SimpleViT -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [36, 32, 1024])  # 6 | 36; 32 and 1024 leave zero channels at the end
def test_simple_vit_3d_table_is_vit_pytorchs_posemb_sincos_3d(dim):
    from vit_pytorch.simple_vit_3d import posemb_sincos_3d
    from vitlab.layers.pos_embed import sincos_nd_big_vision

    grid = (2, 3, 4)
    want = posemb_sincos_3d(torch.zeros(1, *grid, dim))
    torch.testing.assert_close(sincos_nd_big_vision(grid, dim), want, atol=1e-5, rtol=0)
    f = dim // 6  # and by the formula, in float64: [sin x, cos x, sin y, cos y, sin t, cos t] per token, 0 after
    omega = 10000.0 ** -(torch.arange(f, dtype=torch.float64) / (f - 1))
    t, y, x = 1, 2, 3
    row = torch.cat([g(c * omega) for c in (x, y, t) for g in (torch.sin, torch.cos)] + [torch.zeros(dim - 6 * f)])
    torch.testing.assert_close(sincos_nd_big_vision(grid, dim)[t * 12 + y * 4 + x].double(), row, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("one_thread")
def test_simple_vit_3d_uses_the_table_no_class_token_and_the_mean():
    from vitlab.compat.vit_pytorch.simple_vit_3d import SimpleViT

    kw = dict(image_size=16, frames=4, image_patch_size=8, frame_patch_size=2, num_classes=5, dim=32, depth=1,
              heads=2, mlp_dim=48)
    m = randomize_(SimpleViT(**kw)).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    tokens, layout = m.forward_stem(x)
    want = m.patch_embed(x) + m.pos_embed
    torch.testing.assert_close(tokens, want)
    assert layout.num_prefix == 0 and m.pos_embed.shape == (1, 2 * 2 * 2, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        torch.testing.assert_close(m(x), feats.mean(dim=1) @ m.head.weight.T + m.head.bias)
    assert not SimpleViT(**kw).head.weight.any()  # big_vision's zero head
    with pytest.raises(ValueError, match=r"image_size=\(16, 32\)"):
        SimpleViT(**dict(kw, image_size=(16, 32)))


# -- 3-D CCT -------------------------------------------------------------------------------------------------------
TOK = dict(img_size=32, num_frames=6, embedding_dim=32, n_conv_layers=2, kernel_size=3, stride=1, padding=1,
           frame_kernel_size=3, frame_stride=1, frame_pooling_kernel_size=3, frame_pooling_stride=2,
           num_layers=2, num_heads=2, mlp_ratio=1.5, num_classes=5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("extra", [{}, dict(frame_padding=0, frame_pooling_kernel_size=1, frame_pooling_stride=1,
                                        frame_pooling_padding=0, positional_embedding="none"),
                                   dict(n_conv_layers=1, frame_stride=2, positional_embedding="learnable")])
def test_cct_3d_tokenizer_is_vit_pytorchs_and_an_explicit_conv_chain(extra):
    vp_cls, vl_cls = _classes("cct_3d", "CCT")
    kw = dict(TOK, **extra)
    torch.manual_seed(0)
    ref, ours = vp_cls(**kw).eval(), vl_cls(**kw).eval()
    assert _count(ours) == _count(ref)
    assert ours.patch_embed.num_patches == ref.classifier.sequence_length
    ours.patch_embed.load_state_dict(ref.tokenizer.state_dict())  # the same names: conv_layers.{i}.0.weight
    x = torch.randn(2, 3, 6, 32, 32)
    want = ref.tokenizer(x)
    torch.testing.assert_close(ours.patch_embed(x), want)
    fpk = kw["frame_pooling_kernel_size"]  # vit-pytorch's default paddings: half the kernels
    fp, fpp = kw.get("frame_padding", kw["frame_kernel_size"] // 2), kw.get("frame_pooling_padding", fpk // 2)
    y = x  # by hand: conv3d (no bias) -> ReLU -> max-pool, per layer
    for layer in ours.patch_embed.conv_layers:
        y = F.conv3d(y, layer[0].weight, stride=(kw["frame_stride"], 1, 1), padding=(fp, 1, 1)).relu()
        y = F.max_pool3d(y, (fpk, 3, 3), (kw["frame_pooling_stride"], 2, 2), (fpp, 1, 1))
    torch.testing.assert_close(ours.patch_embed(x), y.flatten(2).transpose(1, 2))
    assert ours.grid_size == tuple(y.shape[2:])


def test_cct_3d_arguments_and_refusals():
    from vitlab.compat.vit_pytorch.cct_3d import CCT, cct_2
    from vitlab.models.cct import CCT as FamilyCCT

    with torch.device("meta"):
        m = cct_2(img_size=32, num_frames=4, n_conv_layers=1, stochastic_depth_rate=0.3,
                  positional_embedding="sine")
    assert (len(m.blocks), m.embed_dim, m.blocks[0].attn.num_heads, m.blocks[0].mlp.fc1.out_features) == \
        (2, 128, 2, 128)
    assert m.patch_embed.conv_layers[0][0].stride == (1, 1, 1) and m.patch_embed.conv_layers[0][0].padding == (1, 1, 1)
    assert m.global_pool == "seqpool" and m.cls_token is None and not isinstance(m.pos_embed, nn.Parameter)
    assert (m.blocks[0].attn.attn_drop.p, m.pos_drop.p, m.head_drop.p) == (0.1, 0.0, 0.0)
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    for bad, match in ((dict(seq_pool=False), "fixes it at True"), (dict(dropout_rate=0.2), "dropout_rate"),
                       (dict(frames=4), "frames=4"), (dict(positional_embedding="rope"), "positional_embedding")):
        with pytest.raises(ValueError, match=match):
            CCT(**dict(TOK, **bad))
    with pytest.raises(ValueError, match="2-D code"):
        FamilyCCT(embed="cct3d", img_size=32, patch_size=4, pos_embed="sincos", embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="patch_size=4"):
        FamilyCCT(embed="cct3d", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\) = \(B, 3, 6, 32, 32\)"):
        CCT(**TOK)(torch.randn(2, 3, 32, 32))


# -- the video family's new options ------------------------------------------------------------------------------
def test_video_vit_class_token_option():
    from vitlab.models.video import VideoViT

    kw = dict(img_size=16, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=24, depth=1, num_heads=2)
    with torch.device("meta"):
        plain, mean = VideoViT(**kw), VideoViT(**kw, class_token=False)
    assert plain.cls_token is not None and plain.pos_embed.shape[1] == 9 and plain.global_pool == "token"
    assert mean.cls_token is None and mean.pos_embed.shape[1] == 8 and mean.global_pool == "avg"
    with pytest.raises(ValueError, match="class_token=True"):
        VideoViT(**kw, factorisation="self_attention", class_token=True)
    with pytest.raises(ValueError, match="sincos_big_vision"):
        VideoViT(**kw, pos_embed="fourier")


# -- every class on real tensors at a small size ------------------------------------------------------------------
SMALL_CASES = [
    ("ats_vit", "ViT", dict(SMALL, depth=2, dropout=0.1, emb_dropout=0.1, max_tokens_per_depth=(40, 20)),
     (2, 3, 32, 32)),
    ("simple_vit_3d", "SimpleViT", dict(image_size=16, frames=4, image_patch_size=8, frame_patch_size=2,
                                        num_classes=5, dim=32, depth=2, heads=2, mlp_dim=48), (2, 3, 4, 16, 16)),
    ("cct_3d", "CCT", dict(TOK, positional_embedding="learnable"), (2, 3, 6, 32, 32)),
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mod,cls,kw,shape", SMALL_CASES, ids=[f"{m}.{c}" for m, c, *_ in SMALL_CASES])
def test_small_models_run_train_and_keep_the_contract(mod, cls, kw, shape):
    ours = check_small_contract(mod, cls, kw, shape)
    ours.reset_classifier(3)
    assert ours.get_classifier().out_features == 3 and ours.default_cfg["num_classes"] in (5, 3)
    assert ours.group_matcher() and isinstance(ours.no_weight_decay(), set)


@pytest.mark.usefixtures("one_thread")
def test_navit_nested_list_gives_each_image_alone_and_trains():
    vp_cls, vl_cls = _classes("na_vit_nested_tensor", "NaViT")
    kw = dict(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=48, dim_head=16,
              dropout=0.1, emb_dropout=0.1, token_dropout_prob=0.25)
    torch.manual_seed(0)
    ref, v = vp_cls(**kw).eval(), vl_cls(**kw).eval()
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 16, 16), torch.randn(3, 16, 32), torch.randn(3, 32, 16),
            torch.randn(3, 8, 32)]
    with torch.no_grad():
        out = v(imgs)
        alone = torch.cat([v(img[None]) for img in imgs])  # each image as its own (1, C, H, W) batch
        assert out.shape == ref(imgs).shape == (5, 5)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    assert isinstance(v.blocks[0].attn.q_norm, nn.LayerNorm) and v.blocks[0].attn.head_dim == 16
    y = v.train()(imgs)
    y.sum().backward()
    assert y.shape == (5, 5) and all(torch.isfinite(p.grad).all() for p in v.parameters() if p.grad is not None)
    with record_attention(v) as rec:
        v.eval()(imgs)
    assert rec.last()
    plain = vl_cls(**dict(kw, qk_rmsnorm=False))
    assert not isinstance(getattr(plain.blocks[0].attn, "q_norm", None), nn.LayerNorm)
    assert _count(v) - _count(plain) == 2 * (2 * 2 * 16)  # two LayerNorm(dim_head) per block, weight and bias
