"""ATS placed in a model ("Adaptive Token Sampler for Efficient Vision Transformers", Fayyaz et al., ECCV 2022):
the tokens a block keeps against a hand einsum + brute-force inverse transform sampling, padding that never
leaks (a batch equals each image alone), the identity when every token is kept, gradients, the paper's DeiT-S
placement and its parameter count (timm's DeiT-S: ATS adds none)."""
import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import TokenLayout, record_attention
from vitlab.layers.token_ops import TokenSubset, inverse_transform_sample
from parity import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(depth=2, embed_dim=32, num_heads=2)  # img 32, patch 4: 64 patches + the class token
N_PATCH, K = 64, 65  # the recipe's K = N: every token, yet repeats drop some (sec. 3.2)


def _ats(seed: int = 0, peaked: bool = True, **kw) -> torch.nn.Module:
    """The tiny ATS recipe, every parameter random; ``peaked``: sharper attention, so repeats are common."""
    model = randomize_(vitlab.create_model("ats_vit_tiny_patch4_32", **SMALL, **kw), seed)
    if peaked:
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight[:32].mul_(6.0)  # queries: peaked class-token rows
    return model.double().eval()


def _images(b: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _scores_by_hand(blk, x: torch.Tensor) -> torch.Tensor:
    """eq. 4 by hand: softmax(q_cls k^T / sqrt(d)) per head, times ||v_j|| per head, summed, normalised."""
    b, n, c = x.shape
    xn = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    q, k, v = (xn @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, 2, c // 2).unbind(2)
    a = torch.einsum("bhd,bnhd->bhn", q[:, 0], k).mul(float(c // 2) ** -0.5).softmax(-1)
    s = torch.einsum("bhn,bnh->bn", a[:, :, 1:], v[:, 1:].norm(dim=-1))
    return s / s.sum(-1, keepdim=True)


def _kept_by_brute_force(scores: torch.Tensor, points: int):
    """Per image, the tokens whose CDF interval holds one of the points (2i + 1) / 2K, walked one by one."""
    out = []
    for row in scores.tolist():
        picked = set()
        for i in range(points):
            r, total = (2 * i + 1) / (2 * points), 0.0
            j = next(j for j, s in enumerate(row) if (total := total + s) > r)
            picked.add(j)
        out.append(sorted(picked))
    return out


@torch.no_grad()
def test_a_block_keeps_the_tokens_of_a_brute_force_sampler_at_most_k():
    model = _ats()
    x, layout = model.forward_stem(_images())
    blk = model.blocks[0]
    want = _kept_by_brute_force(_scores_by_hand(blk, x), K - 1)
    full = blk(x, layout)[:, 1:]  # the plain block on every token: ATS keeps some of its rows
    got = model.forward_intermediates(_images(), indices=[0], output_fmt="NLC", intermediates_only=True)[0]
    counts = [len(w) for w in want]
    assert got.shape == (4, max(counts), 32) and max(counts) <= K - 1
    assert len(set(counts)) > 1 and min(counts) < N_PATCH  # images keep different numbers, K = N drops some
    for b, kept in enumerate(want):
        torch.testing.assert_close(got[b, :len(kept)], full[b, kept], rtol=0, atol=1e-10)
        assert not got[b, len(kept):].any()  # padding rows are zeros
    idx, valid = model.ats[0](blk.attn, blk.norm1(x), layout)
    assert all(idx[b][valid[b]].tolist() == w for b, w in enumerate(want))
    assert ((idx >= 0) & (idx < N_PATCH)).all() and (valid.sum(-1) <= K - 1).all()


@torch.no_grad()
def test_a_batch_equals_each_image_alone():
    """Padding is masked out of every later attention: logits, class token and the second block's kept tokens
    of a batch equal those of each image run alone (where nothing pads)."""
    model, x = _ats(seed=2), _images(5, seed=3)
    logits, feats = model(x), model.forward_features(x)
    inter = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert len({int(r.any(-1).sum()) for r in inter[1]}) > 1  # the second block reads padded batches
    for b in range(5):
        one = x[b:b + 1]
        torch.testing.assert_close(model(one), logits[b:b + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_features(one)[:, 0], feats[b:b + 1, 0], rtol=0, atol=1e-5)
        alone = model.forward_intermediates(one, output_fmt="NLC", intermediates_only=True)[1][0]
        torch.testing.assert_close(inter[1][b, :alone.shape[0]], alone, rtol=0, atol=1e-5)
        assert not inter[1][b, alone.shape[0]:].any()


@torch.no_grad()
def test_keeping_every_token_is_the_plain_vit_with_the_same_weights():
    """With enough points (every significance >= 1/K) every token is kept, in order: the plain ViT.  With the
    paper's K = N that is not so: repeated samples count once (the first test), so K >= N alone is no identity."""
    model = _ats(peaked=False, ats=dict(blocks=(0, 1), max_tokens=20_000))
    plain = vitlab.create_model("vit_tiny_patch4_32", **SMALL).double().eval()
    plain.load_state_dict(model.state_dict())
    x = _images()
    inter = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in inter] == [(4, N_PATCH, 32)] * 2
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-10)
    ref = plain.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(inter, ref, rtol=0, atol=1e-10)


def test_training_and_eval_gradients_finite():
    model = _ats(drop_path_rate=0.1, drop_rate=0.1, attn_drop_rate=0.1).float().train()
    out = model(_images().float())
    out.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert torch.isfinite(out).all() and not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():  # deterministic points: evaluation is repeatable
        assert torch.equal(model(_images().float()), model(_images().float()))


def test_deit_small_recipe_is_the_papers_placement_and_timms_parameters():
    """Sec. 4.1: DeiT-S with ATS in blocks 4-12 at most K = 197 tokens; parameter-free, so the parameters and
    state-dict keys are timm's ``deit_small_patch16_224`` (22.05M; DeiT's table 1: 22M)."""
    with torch.device("meta"):
        ours = vitlab.create_model("ats_deit_small_patch16_224")
        ref = timm.create_model("deit_small_patch16_224")
        plain = vitlab.create_model("deit_small_patch16_224")
    assert sorted(ours.in_block) == list(range(3, 12))
    assert [s.num_tokens for s in ours.ats] == [196] * 9  # K - 1 points over the patches
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in plain.parameters())
    assert count == 22_050_664 and set(ours.state_dict()) == set(ref.state_dict())
    assert ours(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


@torch.no_grad()
def test_intermediates_attention_records_and_halves():
    model, x = _ats(ats=dict(blocks=(1,))), _images(3)
    first = model.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    assert first.shape == (3, 32, 8, 8)  # before sampling the map is whole
    with pytest.raises(ValueError, match="tokens left by adaptive token sampling from the \\(8, 8\\) grid form no"):
        model.forward_intermediates(x, indices=[1])
    with pytest.raises(ValueError, match="adaptive token sampling"):
        model.forward_halves(x)
    model = _ats()
    with record_attention(model) as rec:
        model(x)
    probs = rec.last()
    assert set(probs) == {"blocks.0.attn", "blocks.1.attn"}
    p = probs["blocks.1.attn"]  # after block 0 sampled: (B, H, 1 + K', 1 + K')
    kept = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0].any(-1)
    assert p.shape[-1] == 1 + kept.shape[1] and not kept.all()
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    assert not p[..., 1:].masked_select(~kept[:, None, None, :]).any()  # padded keys get no attention


def test_padding_is_never_sampled_past_a_rounded_total():
    scores = torch.tensor([[0.5, 0.5 - 1e-6, 0.0, 0.0]])
    idx, valid = inverse_transform_sample(scores, torch.tensor([[0.25, 0.9999995]]))
    assert idx.tolist() == [[0, 1]] and valid.all()  # not token 3, whose score (padding) is zero


def test_errors_name_the_bad_value():
    mk = lambda **kw: vitlab.create_model("ats_vit_tiny_patch4_32", **SMALL, **kw)  # noqa: E731
    for kw, msg in ((dict(class_token=False, global_pool="avg"), "needs class_token=True"),
                    (dict(global_pool="avg"), "global_pool='avg'"),
                    (dict(patch_merger=dict(after=1)), "no patch_merger"),
                    (dict(ats=dict(blocks=(2,))), "in -2..1"),
                    (dict(ats=dict(blocks=(0, -2))), "distinct"),
                    (dict(ats=dict(max_tokens=1)), "more than the 1 prefix"),
                    (dict(ats=dict(max_tokens=(9, 9, 9))), "one per block \\(2\\)"),
                    (dict(ats=dict(max_token=9)), "max_token"),
                    (dict(mixer="focused_linear"), "ats take away")):
        with pytest.raises(ValueError, match=msg):
            mk(**kw)
    with pytest.raises(ValueError, match="pool the padding of adaptive token sampling"):
        mk().reset_classifier(3, global_pool="avg")
    with pytest.raises(ValueError, match="wiring 'pre' or 'post'"):
        mk(num_parallel=2)(torch.randn(1, 3, 32, 32))
    assert isinstance(TokenSubset.of(3, 1, "x"), TokenLayout)
