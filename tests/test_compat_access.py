"""vitlab.compat.vit_pytorch's ``Recorder`` and ``Extractor``: vit-pytorch's README usage on vitlab models.

Recorded maps are compared with ``softmax(q k^T / sqrt(d))`` recomputed from each block's qkv weights on the block's
input, and their shapes with vit-pytorch's own ``Recorder`` on vit-pytorch's ViT (README configuration, on the meta
device); embeddings with ``forward_features``, with the head applied by hand, with autograd (the gradient of the
logits reaches them exactly as the head's weights say) and with vit-pytorch's ``Extractor`` shapes (ViT, CrossViT).
Every family's small model runs both wrappers, and ``eject()`` leaves the model's output bit for bit, its module
tree and its hooks as before."""
import math

import pytest
import torch
from torch import nn

import vitlab
from parity import randomize_
from vitlab.analysis.attention import is_signed
from vitlab.compat.vit_pytorch.cross_vit import CrossViT
from vitlab.compat.vit_pytorch.extractor import Extractor
from vitlab.compat.vit_pytorch.recorder import Recorder
from vitlab.compat.vit_pytorch.vit import ViT
from vitlab.compat.vit_pytorch.xcit import XCiT
from vitlab.layers import record_attention
from vitlab.layers.recording import attention_modules
from vitlab.models.parts_table import FAMILY_EXAMPLES

vit_pytorch = pytest.importorskip("vit_pytorch")
from vit_pytorch.cross_vit import CrossViT as VpCrossViT  # noqa: E402
from vit_pytorch.extractor import Extractor as VpExtractor  # noqa: E402
from vit_pytorch.recorder import Recorder as VpRecorder  # noqa: E402
from vit_pytorch.vit import ViT as VpViT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=48, dim_head=16)
README = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048,
              dropout=0.1, emb_dropout=0.1)
CROSS_README = dict(image_size=256, num_classes=1000, depth=4, sm_dim=192, sm_patch_size=16, sm_enc_depth=2,
                    sm_enc_heads=8, sm_enc_mlp_dim=2048, lg_dim=384, lg_patch_size=64, lg_enc_depth=3, lg_enc_heads=8,
                    lg_enc_mlp_dim=2048, cross_attn_depth=2, cross_attn_heads=8, dropout=0.1, emb_dropout=0.1)
CROSS_SMALL = dict(image_size=32, num_classes=5, depth=1, sm_dim=16, sm_patch_size=8, sm_enc_depth=1, sm_enc_heads=2,
                   sm_enc_mlp_dim=32, lg_dim=32, lg_patch_size=16, lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=64,
                   cross_attn_depth=1, cross_attn_heads=2, sm_enc_dim_head=8, lg_enc_dim_head=8, cross_attn_dim_head=8,
                   dropout=0.0, emb_dropout=0.0)


def _vit(**kw):
    model = ViT(**{**SMALL, **kw})
    return randomize_(model, seed=1).eval()  # every weight and bias non-trivial


def _img(batch=2, side=32, seed=0):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _explicit_maps(model, x):
    """softmax(q k^T / sqrt(d)) per block, q and k from the block's qkv weights on its input (Vaswani et al. 2017,
    sec. 3.2.1), the block input built by running the blocks in turn."""
    maps, (tokens, layout) = [], model.forward_stem(x)
    for blk in model.blocks:
        attn = blk.attn
        qkv = blk.norm1(tokens) @ attn.qkv.weight.T + attn.qkv.bias
        q, k, _ = qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4)
        maps.append(torch.einsum("bhid,bhjd->bhij", q, k).div(math.sqrt(attn.head_dim)).softmax(dim=-1))
        tokens = blk(tokens, layout)
    return torch.stack(maps, dim=1)


# -- Recorder ---------------------------------------------------------------------------------------------------------
def test_recorder_maps_are_the_explicit_softmax_of_every_block_and_never_stale():
    model = _vit()
    rec = Recorder(model)
    for seed in (0, 1):  # the second call must hold the second image's maps only
        x = _img(seed=seed)
        with torch.no_grad():
            preds, attns = rec(x)
            want = _explicit_maps(model, x)
            torch.testing.assert_close(preds, model(x), atol=1e-5, rtol=1e-5)
        assert attns.shape == (2, 2, 2, 17, 17) and len(rec.recordings) == 2
        torch.testing.assert_close(attns, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(attns.sum(-1), torch.ones(2, 2, 2, 17), atol=1e-6, rtol=0)
    assert rec.names == ["blocks.0.attn", "blocks.1.attn"] and rec.layouts[0].grid == (4, 4)
    _, attns = rec(_img())  # with autograd on: the maps are detached, as vit-pytorch's clone().detach()
    assert not attns.requires_grad
    rec.clear()
    assert rec.recordings == [] and rec.names == []


def test_recorder_shapes_equal_vit_pytorch_recorder_on_its_readme_vit():
    with torch.device("meta"):
        ref = VpRecorder(VpViT(**README).eval())
        ours = Recorder(ViT(**README).eval())
        img = torch.empty(1, 3, 256, 256)
        _, want = ref(img)
        _, got = ours(img)
    assert got.shape == want.shape == (1, 6, 16, 65, 65)
    torch.manual_seed(0)
    ref_small, x = VpRecorder(VpViT(**SMALL).eval()), _img()  # real tensors: rows of both are distributions
    with torch.no_grad():
        _, want = ref_small(x)
        _, got = Recorder(_vit())(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got.sum(-1), want.sum(-1), atol=1e-6, rtol=0)


def test_recorder_returns_a_list_of_window_maps_for_swin():
    name, kw, size = FAMILY_EXAMPLES["swin"]
    model = vitlab.create_model(name, **kw).eval()
    with torch.no_grad():
        _, maps = Recorder(model)(torch.randn(2, *size))
    expected = []  # (batch * windows, heads, ws^2, ws^2) per block, from the model's own configuration
    for i, stage in enumerate(model.layers):
        ws = kw["window_size"]
        windows = stage.grid_size[0] * stage.grid_size[1] // ws ** 2
        expected += [(2 * windows, kw["num_heads"][i], ws * ws, ws * ws)] * kw["depths"][i]
    assert isinstance(maps, list) and [tuple(m.shape) for m in maps] == expected
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)


def test_recorder_keeps_what_record_attention_records_for_matrix_free_cores():
    """focused_linear records its implied N x N matrix, cross_covariance its (d, d) channel attention."""
    flat = vitlab.create_model("vit_tiny_patch4_32", mixer="focused_linear", img_size=16, depth=2, embed_dim=32,
                               num_heads=2).eval()
    xcit = XCiT(**dict(SMALL, heads=4, cls_depth=1, dim_head=8, layer_dropout=0.0)).eval()  # d = 8, N = 16 tokens
    for model, x in ((flat, _img(side=16)), (xcit, _img())):
        with torch.no_grad():
            _, maps = Recorder(model)(x)
            with record_attention(model) as rec:
                model(x)
        want = [m for ms in rec.maps.values() for m in ms]
        got = list(maps.unbind(1)) if torch.is_tensor(maps) else maps
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert [tuple(m.shape) for m in got if m.shape[-1] == 8] == [(2, 4, 8, 8)] * 2  # XCA's two channel maps


def test_recorder_refuses_models_without_attention_and_calls_after_eject():
    name, kw, size = FAMILY_EXAMPLES["vit"]
    cnn = vitlab.create_model("resnet50", img_size=32, layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="no attention modules"):
        Recorder(cnn)(_img())
    rec = Recorder(vitlab.create_model(name, **kw))
    rec.eject()
    with pytest.raises(ValueError, match="ejected"):
        rec(torch.randn(1, *size))


# -- Extractor --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_extractor_embeddings_are_the_tokens_the_head_reads(pool):
    model, x = _vit(pool=pool), _img()
    torch.manual_seed(0)
    ref = VpExtractor(VpViT(**dict(SMALL, pool=pool)).eval())
    with torch.no_grad():
        logits, emb = Extractor(model)(x)
        assert emb.shape == ref(x)[1].shape == ((2, 17, 32) if pool == "cls" else (2, 16, 32))
        assert torch.equal(emb, model.forward_features(x))
        pooled = emb[:, 0] if pool == "cls" else emb.mean(dim=1)  # vit-pytorch's pooling, written out
        torch.testing.assert_close(model.head(pooled), logits, atol=0, rtol=0)


def test_extractor_detach_false_keeps_the_graph_into_the_head():
    model, x = _vit(), _img()
    logits, emb = Extractor(model, detach=False)(x)
    grad, = torch.autograd.grad(logits.sum(), emb)
    want = torch.zeros_like(emb)
    want[:, 0] = model.head.weight.sum(0)  # d(sum head(emb[:, 0])) / d emb: only the class token, the head's rows
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)
    emb.square().sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    logits, emb = Extractor(model, detach=True)(x)
    assert not emb.requires_grad and logits.requires_grad
    with pytest.raises(RuntimeError):
        torch.autograd.grad(logits.sum(), emb)


def test_crossvit_gives_both_branches_with_vit_pytorch_shapes():
    with torch.device("meta"):
        ref = VpExtractor(VpCrossViT(**CROSS_README), layer_name="multi_scale_encoder")
        ours = Extractor(CrossViT(**CROSS_README), layer_name="multi_scale_encoder")
        img = torch.empty(1, 3, 256, 256)
        want = [t.shape for t in ref(img)[1]]
        got = [t.shape for t in ours(img)[1]]
    assert got == want == [(1, 257, 192), (1, 17, 384)]
    model, x = randomize_(CrossViT(**CROSS_SMALL), seed=2).eval(), _img()
    with torch.no_grad():
        logits, emb = Extractor(model, layer_name="multi_scale_encoder")(x)
        assert isinstance(emb, tuple) and all(torch.equal(a, b) for a, b in zip(emb, model.forward_features(x)))
        by_hand = torch.stack([head(t[:, 0]) for head, t in zip(model.head, emb)]).mean(dim=0)  # sec. 3.2
        torch.testing.assert_close(by_hand, logits, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="forward_stem"):
        Extractor(model, layer_save_input=True)


def test_extractor_layer_names_map_to_vitlab_modules_or_are_refused():
    model, x = _vit(), _img()
    torch.manual_seed(0)
    vp = VpViT(**SMALL).eval()
    with torch.no_grad():
        tokens, layout = model.forward_stem(x)
        first = model.blocks[0](tokens, layout)
        second = model.blocks[1](first, layout)
        assert torch.equal(Extractor(model, layer_name="blocks.1")(x)[1], second)
        assert torch.equal(Extractor(model, layer=model.blocks[0])(x)[1], first)
        saved = Extractor(model, layer_name="blocks.1", layer_save_input=True)(x)[1]
        assert isinstance(saved, tuple) and len(saved) == 1 and torch.equal(saved[0], first)  # the layout dropped
        stem = Extractor(model, layer_save_input=True)(x)[1]  # the transformer's input, a 1-tuple as vit-pytorch's
        want = VpExtractor(vp, layer_save_input=True)(x)[1]
        assert len(stem) == len(want) == 1 and stem[0].shape == want[0].shape and torch.equal(stem[0], tokens)
        patches = Extractor(model, layer_name="to_patch_embedding")(x)[1]
        want = VpExtractor(vp, layer_name="to_patch_embedding")(x)[1]
        assert patches.shape == want.shape and torch.equal(patches, model.patch_embed(x))
        logits, head_out = Extractor(model, layer_name="mlp_head")(x)
        assert torch.equal(head_out, logits)
        assert torch.equal(Extractor(vp)(x)[1], VpExtractor(vp)(x)[1])  # vit-pytorch's own ViT: its 'transformer'
    with pytest.raises(ValueError, match=r"layer_name='transformerr' is not a module of ViT; .*'blocks'"):
        Extractor(model, layer_name="transformerr")
    with pytest.raises(ValueError, match="not a submodule"):
        Extractor(model, layer=nn.Linear(2, 2))


def test_extractor_options_embeddings_only_and_device():
    model, x = _vit(), _img()
    with torch.no_grad():
        emb = Extractor(model, return_embeddings_only=True)(x)
        assert torch.equal(emb, Extractor(model)(x, return_embeddings_only=True))
        assert torch.equal(emb, model.forward_features(x))
        assert Extractor(model, device="meta")(x)[1].device.type == "meta"
        assert Recorder(model, device="meta")(x)[1].device.type == "meta"
    ext = Extractor(model)
    ext(x)
    assert ext.latents is not None
    ext.clear()
    assert ext.latents is None
    ext.eject()
    with pytest.raises(ValueError, match="ejected"):
        ext(x)


# -- every family: both wrappers, and eject() restores the model ------------------------------------------------------
def _state(model):
    hooks = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    sinks = [n for n, m in attention_modules(model) if m._attn_sink is not None]
    return (repr(model), [(n, type(m)) for n, m in model.named_modules()], hooks, sinks,
            sorted(k for k in vars(model) if not k.startswith("_")), "forward_head" in vars(model))


@pytest.mark.parametrize("family", sorted(FAMILY_EXAMPLES))
def test_every_family_records_extracts_and_ejects_cleanly(family):
    name, kw, size = FAMILY_EXAMPLES[family]
    torch.manual_seed(0)
    model = vitlab.create_model(name, **kw).eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        before, state = model(x), _state(model)
        wrapped = Recorder(model)
        preds, maps = wrapped(x)
        preds, maps = wrapped(x)  # a second call: the same maps, not twice as many
        names = list(wrapped.names)
        assert wrapped.eject() is model and wrapped.recordings == []
        tap = Extractor(model, layer_name=list(attention_modules(model))[-1][0])  # a forward hook on the last attention
        assert tap(x)[1] is not None and tap.eject() is model
        logits, emb = Extractor(model)(x)  # the head's input
        feats = model.forward_features(x)
        after = model(x)
    assert torch.equal(after, before) and _state(model) == state  # the fused path is back, no hook, no wrapper
    maps = list(maps.unbind(1)) if torch.is_tensor(maps) else maps
    assert len(maps) == len(names) and set(names) == {n for n, _ in attention_modules(model)}
    torch.testing.assert_close(preds, before, atol=1e-5, rtol=1e-4)  # the explicit path, up to float rounding
    for m in maps:
        assert torch.isfinite(m).all()
        if not is_signed(m):
            torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-4, rtol=0)
    emb, feats = (emb, feats) if isinstance(emb, tuple) else ((emb,), (feats,))
    assert all(torch.equal(a, b) for a, b in zip(emb, feats)) and torch.equal(logits, before)


def test_record_attention_leaves_modules_as_they_were_and_nests():
    """No ``_attn_sink`` attribute is left behind, and an enclosing recording keeps recording after an inner one."""
    from vitlab.models.vit import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    attn = model.blocks[0].attn
    img = torch.randn(1, 3, 16, 16)
    with record_attention(model) as outer:
        with record_attention(model) as inner:
            model(img)
        model(img)
    assert "_attn_sink" not in vars(attn)
    assert len(inner.maps["blocks.0.attn"]) == 1 and len(outer.maps["blocks.0.attn"]) == 1
