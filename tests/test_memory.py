"""Learnable memory (Sandler et al., CVPR 2022): the ``memory`` projection against explicit einsums, and
the memory adapter against a brute-force masked joint forward, with the frozen model's logits
bit-identical and gradients reaching only the new parameters."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.models.memory import MemoryAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and p.numel() == 32 else 0.0))
    return module


def _heads(t, h):
    return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def test_memory_projection_equals_explicit_einsums():
    attn = _randomize(MultiHeadAttention(32, 2, projection="memory", num_memory=3, layout=TokenLayout((2, 3), 1)))
    x = torch.randn(2, 7, 32)
    w, b, mem = attn.qkv.weight, attn.qkv.bias, attn.memory
    kv_in = torch.cat([x, mem.expand(2, -1, -1)], dim=1)  # memory: keys and values only
    q = _heads(torch.einsum("bnc,dc->bnd", x, w[:32]) + b[:32], 2)
    k = _heads(torch.einsum("bnc,dc->bnd", kv_in, w[32:64]) + b[32:64], 2)
    v = _heads(torch.einsum("bnc,dc->bnd", kv_in, w[64:]) + b[64:], 2)
    a = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * 16 ** -0.5, dim=-1)
    o = torch.einsum("bhqk,bhkd->bqhd", a, v).reshape(2, 7, 32)
    want = torch.einsum("bnc,dc->bnd", o, attn.proj.weight) + attn.proj.bias
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
    with record_attention(attn) as rec:
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)  # the explicit path too
    torch.testing.assert_close(rec.last()[""], a, rtol=1e-5, atol=1e-6)
    assert a.shape == (2, 2, 7, 10)  # 7 queries, 7 + 3 keys


def test_memory_projection_in_a_vit_and_its_refusals():
    kw = dict(SMALL, mixer_kwargs=dict(projection="memory", num_memory=4))
    model = vitlab.create_model("vit_tiny_patch16_224", **kw)
    base = vitlab.create_model("vit_tiny_patch16_224", **SMALL)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) - n(base) == 2 * 4 * 32  # depth x num_memory x dim
    assert set(model.state_dict()) - set(base.state_dict()) == {"blocks.0.attn.memory", "blocks.1.attn.memory"}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.blocks[0].attn.memory.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_memory must be >= 1, got 0"):
        MultiHeadAttention(32, 2, projection="memory", num_memory=0)
    with pytest.raises(ValueError, match="projection 'memory'.*core 'focused_linear'"):
        MultiHeadAttention(32, 2, projection="memory", core="focused_linear", layout=TokenLayout((2, 2)))


# -- the adapter ----------------------------------------------------------------------------------
def _backbone(**kw):
    torch.manual_seed(0)
    return _randomize(vitlab.create_model("vit_tiny_patch16_224", **dict(SMALL, **kw)), 1).eval()


def _masked_joint_forward(bb, ad, x):
    """Brute force: one sequence [new class token, class token, patches] per block, keys/values followed
    by that block's memory, and the mask: the old tokens see neither the new class token nor the memory."""
    t, _ = bb.forward_stem(x)
    t = torch.cat([ad.cls_token.expand(len(x), -1, -1), t], dim=1)
    n, d, h = t.shape[1], t.shape[2], 2
    for blk, mem in zip(bb.blocks, ad.memory):
        y = F.layer_norm(t, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        kv_in = torch.cat([y, mem.tokens.expand(len(x), -1, -1)], dim=1)
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        q, k, v = (_heads(inp @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d], h) for i, inp in
                   enumerate((y, kv_in, kv_in)))
        allowed = torch.ones(n, kv_in.shape[1], dtype=torch.bool)
        allowed[1:, 0] = allowed[1:, n:] = False
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * (d // h) ** -0.5
        a = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        o = torch.einsum("bhqk,bhkd->bqhd", a, v).reshape(len(x), n, d)
        t = t + o @ blk.attn.proj.weight.T + blk.attn.proj.bias
        t = t + blk.mlp(F.layer_norm(t, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps))
    return F.layer_norm(t, (d,), bb.norm.weight, bb.norm.bias, bb.norm.eps)


def test_adapter_equals_the_masked_joint_forward_and_keeps_old_logits_bit_identical():
    bb, x = _backbone(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        old_before = bb(x)
    ad = MemoryAdapter(bb, num_memory=3, num_classes=4)
    with torch.no_grad():  # the new parameters only
        for p in (ad.cls_token, *ad.memory.parameters(), *ad.head.parameters()):
            p.normal_(0, 0.5)
    with torch.no_grad():
        old, new = ad.forward_both(x)
        feats = ad.forward_features(x)
        torch.testing.assert_close(feats, _masked_joint_forward(bb, ad, x), rtol=1e-5, atol=1e-5)
        assert torch.equal(old, old_before) and torch.equal(old, bb(x))  # bit-identical
        torch.testing.assert_close(new, feats[:, 0] @ ad.head.weight.T + ad.head.bias, rtol=0, atol=0)
        assert torch.equal(ad(x), new)


def test_adapter_gradients_reach_only_the_new_parameters():
    bb, x = _backbone(), torch.randn(2, 3, 32, 32)
    ad = MemoryAdapter(bb, num_memory=2, num_classes=3)
    old, new = ad.forward_both(x)
    # the old task's logits do not depend on the new parameters: exactly zero gradient (or none)
    new_params = [ad.cls_token, ad.memory[0].tokens, ad.memory[1].tokens]
    for g in torch.autograd.grad(old.square().sum(), new_params, allow_unused=True, retain_graph=True):
        assert g is None or not g.any()
    F.cross_entropy(new, torch.tensor([0, 2])).backward()
    got = {n for n, p in ad.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"cls_token", "memory.0.tokens", "memory.1.tokens", "head.weight", "head.bias"}
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    # a training step of the new task leaves the old task's logits exactly as they were
    with torch.no_grad():
        before = bb(x)
    torch.optim.SGD([p for p in ad.parameters() if p.requires_grad], lr=1.0).step()
    ad.train()
    assert not bb.training
    with torch.no_grad():
        assert torch.equal(ad.forward_both(x)[0], before)


def test_adapter_model_contract():
    from timm.optim import create_optimizer_v2

    bb, x = _backbone(), torch.randn(2, 3, 32, 32)
    ad = MemoryAdapter(bb, num_memory=2, num_classes=3).eval()
    with record_attention(ad) as rec:
        ad(x)
    maps = rec.last()
    assert maps["memory.1"].shape == (2, 2, 1, 1 + 17 + 2) and maps["backbone.blocks.1.attn"].shape == (2, 2, 17, 17)
    torch.testing.assert_close(maps["memory.0"].sum(-1), torch.ones(2, 2, 1))
    inter = ad.forward_intermediates(x, intermediates_only=True)
    assert [t.shape for t in inter] == [(2, 32, 4, 4)] * 2
    assert ad.feature_info[1]["module"] == "backbone.blocks.1" and ad.default_cfg["num_classes"] == 3
    ad.reset_classifier(7)
    assert ad(x).shape == (2, 7) and ad.get_classifier().out_features == 7
    opt = create_optimizer_v2(ad, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    groups = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(groups) == 5  # only the trainable parameters: class token, 2 memories, head weight and bias
    assert groups[id(ad.memory[0].tokens)][0] < groups[id(ad.memory[1].tokens)][0] < groups[id(ad.head.weight)][0]
    assert groups[id(ad.memory[0].tokens)][1] == 0.0 and "cls_token" in ad.no_weight_decay()


def test_adapter_refuses_backbones_it_cannot_read():
    with pytest.raises(ValueError, match="block 0: mixer Pooling"):
        MemoryAdapter(_backbone(mixer="pooling"), num_memory=2, num_classes=3)
    with pytest.raises(ValueError, match="FeatScale"):
        MemoryAdapter(_backbone(featscale=True), num_memory=2, num_classes=3)
    with pytest.raises(ValueError, match="isotropic"):
        MemoryAdapter(vitlab.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=1, depth_token_only=1,
                                          embed_dim=32, num_heads=2), num_memory=2, num_classes=3)
