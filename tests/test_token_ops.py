"""Token-count parts: PatchDropout against timm, the PatchMerger against a hand einsum and vit-pytorch,
adaptive token sampling against a brute-force re-implementation."""
import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import TokenLayout, record_attention
from vitlab.layers.token_ops import PatchMerger, TokenSubset
from parity import check_parity, timm_pair

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


# -- PatchDropout (Liu et al., WACV 2023) -----------------------------------------------------------
def test_patch_drop_rate_keeps_timm_parity_in_eval():
    """In eval PatchDropout is the identity: every parameter randomised, logits and block maps equal timm's
    both ways, with timm's ``patch_drop_rate`` set in both."""
    check_parity("vit_tiny_patch16_224", img_size=32, depth=2, patch_drop_rate=0.25)


def test_patch_drop_in_training_equals_timm_at_the_same_seed():
    from timm.layers.patch_dropout import patch_dropout_forward

    ref, ours = timm_pair("vit_tiny_patch16_224", img_size=64, depth=2, patch_drop_rate=0.5)
    x = torch.randn(3, 3, 64, 64)
    full, full_layout = ours.eval().forward_stem(x)
    ref.train(), ours.train()
    torch.manual_seed(7)
    want = ref.forward_features(x)
    torch.manual_seed(7)
    got = ours.forward_features(x)
    keep = int(full_layout.num_grid * 0.5)  # timm's count, 2 of the 2x2 patches
    assert got.shape == want.shape == (3, 1 + keep, 192)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the kept tokens: the class token, then the patches timm's function picks with the same noise
    torch.manual_seed(3)
    kept, layout = ours.forward_stem(x)
    torch.manual_seed(3)
    _, idx = patch_dropout_forward(full, 0.5, 1, ordered=False, training=True)
    assert isinstance(layout, TokenSubset) and layout.num_prefix == 1 and layout.grid == (keep,)
    assert torch.equal(kept[:, 0], full[:, 0])
    assert torch.equal(kept[:, 1:], full[:, 1:].gather(1, idx[..., None].expand(-1, -1, 192)))
    assert all(len(set(r.tolist())) == keep and max(r.tolist()) < full_layout.num_grid for r in idx)


def test_tokens_after_patch_drop_refuse_map_parts():
    x = torch.randn(2, 3, 32, 32)
    pooled = vitlab.create_model("vit_tiny_patch16_224", mixer="pooling", patch_drop_rate=0.5, **SMALL)
    assert pooled.eval()(x).shape == (2, 5)  # eval: the identity, the map is whole
    with pytest.raises(ValueError, match="8 tokens left by patch dropout from the \\(4, 4\\) grid form no map"):
        pooled.train()(x)
    vit = vitlab.create_model("vit_tiny_patch16_224", patch_drop_rate=0.5, **SMALL).train()
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        vit.forward_intermediates(x)
    assert [t.shape for t in vit.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)] == \
        [(2, 8, 32)] * 2
    with pytest.raises(ValueError, match="patch_drop_rate must be in \\[0, 1\\), got 1.0"):
        vitlab.create_model("vit_tiny_patch16_224", patch_drop_rate=1.0, **SMALL)


# -- PatchMerger (Renggli et al., 2022) -------------------------------------------------------------
def _random_merger(dim=16, m=3, eps=1e-6):
    merger = PatchMerger(dim, m, norm_eps=eps)
    with torch.no_grad():
        merger.queries.normal_(0, 0.5), merger.norm.weight.normal_(1, 0.3), merger.norm.bias.normal_(0, 0.3)
    return merger


def test_patch_merger_equals_a_hand_einsum():
    merger, (b, p, n, d) = _random_merger(), (2, 1, 12, 16)
    x = torch.randn(b, p + n, d)
    y, layout = merger(x, TokenLayout((3, 4), p))
    t = x[:, p:]
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
    t = t * merger.norm.weight + merger.norm.bias
    s = torch.einsum("md,bnd->bmn", merger.queries, t)
    a = s.exp() / s.exp().sum(-1, keepdim=True)  # softmax over the N input tokens
    torch.testing.assert_close(y[:, p:], torch.einsum("bmn,bnd->bmd", a, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:, :p], x[:, :p])  # the class token passes through
    assert layout == TokenSubset((3,), 1) and layout.full_grid == (3, 4)
    torch.testing.assert_close(merger.weights(x, TokenLayout((3, 4), p)), a, rtol=1e-5, atol=1e-6)


def test_patch_merger_equals_vit_pytorch_with_rescaled_queries():
    from vit_pytorch.vit_with_patch_merger import PatchMerger as Reference

    ours, d = _random_merger(eps=1e-5), 16  # vit-pytorch's LayerNorm eps
    ref = Reference(dim=d, num_tokens_out=3)
    with torch.no_grad():
        ref.norm.load_state_dict(ours.norm.state_dict())
        ref.queries.copy_(ours.queries * d ** 0.5)  # it scales the scores by 1/sqrt(D)
    x = torch.randn(2, 10, d)
    torch.testing.assert_close(ours(x, TokenLayout((2, 5)))[0], ref(x), rtol=1e-5, atol=1e-5)


def test_vit_with_patch_merger_is_blocks_merger_blocks():
    model = vitlab.create_model("vit_tiny_patch16_224", patch_merger=dict(after=2, num_tokens=3),
                                **dict(SMALL, depth=4)).eval()
    base = vitlab.create_model("vit_tiny_patch16_224", **dict(SMALL, depth=4))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) - n(base) == 3 * 32 + 2 * 32  # M queries + the merger's LayerNorm
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t, layout = model.forward_stem(x)
        for blk in model.blocks[:2]:
            t = blk(t, layout)
        t, merged = model.patch_merger(t, layout)
        for blk in model.blocks[2:]:
            t = blk(t, merged)
        torch.testing.assert_close(model(x), model.head(model.norm(t)[:, 0]), rtol=0, atol=0)
        with record_attention(model) as rec:
            model(x)
    assert [m.shape[-1] for m in rec.last().values()] == [17, 17, 4, 4]
    nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert [f.shape[1] for f in nlc] == [16, 16, 3, 3]
    with pytest.raises(ValueError, match="PatchMerger from the \\(4, 4\\) grid form no map"):
        model.forward_intermediates(x)


def test_patch_merger_layer_decay_group_and_errors():
    from timm.optim import create_optimizer_v2

    model = vitlab.create_model("vit_tiny_patch16_224", patch_merger=dict(after=1, num_tokens=2), **SMALL)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale[id(model.patch_merger.queries)] == scale[id(model.blocks[0].attn.qkv.weight)]
    assert scale[id(model.patch_merger.queries)] < scale[id(model.blocks[1].attn.qkv.weight)]
    with pytest.raises(ValueError, match="after=2 must be in 1..1"):
        vitlab.create_model("vit_tiny_patch16_224", patch_merger=dict(after=2), **SMALL)
    with pytest.raises(ValueError, match="'num_tokes'.*valid keys: after, num_tokens"):
        vitlab.create_model("vit_tiny_patch16_224", patch_merger=dict(num_tokes=2), **SMALL)
    with pytest.raises(ValueError, match="focused_linear.*convolves the token map"):
        vitlab.create_model("vit_tiny_patch16_224", mixer="focused_linear", patch_merger=dict(after=1), **SMALL)


# -- Adaptive Token Sampling (Fayyaz et al., ECCV 2022) ---------------------------------------------
def _brute_force_sample(scores, u):
    """Per image and point: walk the tokens, adding their scores until the sum passes the point."""
    out = []
    for row, points in zip(scores.tolist(), u.tolist()):
        picked = set()
        for r in points:
            total, j = 0.0, len(row) - 1
            for i, s in enumerate(row):
                total += s
                if total > r:
                    j = i
                    break
            picked.add(j)
        out.append(sorted(picked))
    return out


def test_inverse_transform_sampling_equals_brute_force_given_the_same_noise():
    from vitlab.layers.token_ops import ats_points, inverse_transform_sample

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 20, generator=g, dtype=torch.float64) ** 4  # peaked: many repeats
    scores /= scores.sum(-1, keepdim=True)
    for k, u in ((8, ats_points(6, 8, generator=g, random=True).double()), (5, ats_points(6, 5).double()),
                 (40, torch.rand(6, 40, generator=g, dtype=torch.float64))):
        idx, valid = inverse_transform_sample(scores, u)
        want = _brute_force_sample(scores, u)
        assert idx.shape == valid.shape == (6, k) and ((idx >= 0) & (idx < 20)).all()
        for b in range(6):
            got = idx[b][valid[b]].tolist()
            assert got == want[b] and len(got) <= k  # unique, ascending, at most K
            assert valid[b].tolist() == [True] * len(got) + [False] * (k - len(got))
        assert any(len(w) < k for w in want)  # repeats were dropped somewhere


def test_ats_scores_are_the_class_attention_weighted_by_value_norms():
    from vitlab.layers import MultiHeadAttention
    from vitlab.layers.token_ops import AdaptiveTokenSampler

    attn = MultiHeadAttention(16, 2, layout=TokenLayout((3, 3), 1))
    xn = torch.randn(2, 10, 16)
    ats = AdaptiveTokenSampler(4)
    with record_attention(attn) as rec:
        attn(xn)
    a = rec.last()[""]  # (B, H, N, N), the full matrix
    v = (xn @ attn.qkv.weight[32:].T + attn.qkv.bias[32:]).reshape(2, 10, 2, 8)
    s = torch.einsum("bhj,bjh->bj", a[:, :, 0, 1:], v[:, 1:].norm(dim=-1))
    torch.testing.assert_close(ats.scores(attn, xn, TokenLayout((3, 3), 1)), s / s.sum(-1, keepdim=True))
    idx, valid = ats(attn, xn, TokenLayout((3, 3), 1))
    assert idx.shape == (2, 4) and valid[:, 0].all() and (idx < 9).all()
    with pytest.raises(ValueError, match="needs a class token"):
        ats.scores(attn, xn, TokenLayout((2, 5), 0))
