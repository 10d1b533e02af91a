"""Volumes and video: tubelet stem, n-D sin-cos, axial grouping, ViViT models 1-3 (Arnab et al., ICCV 2021)."""
import math

import pytest
import torch

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, sincos_2d
from vitlab.layers.video import TubeletEmbed, sincos_nd

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=16, num_frames=4, patch_size=4, tubelet_size=2, embed_dim=24, num_heads=2, num_classes=5)


def _video(b=2, t=4, s=16, c=3, seed=1):
    return torch.randn(b, c, t, s, s, generator=torch.Generator().manual_seed(seed))


def test_tubelet_embedding_is_a_linear_map_of_each_tubelet():
    """Each token = W . (the t x p x p x C tubelet, flattened) + b, tubelets in (time, row, column) order."""
    torch.manual_seed(0)
    emb = TubeletEmbed(img_size=8, num_frames=4, patch_size=4, tubelet_size=2, in_chans=3, embed_dim=5)
    x = _video(b=2, t=4, s=8)
    tubes = x.unfold(2, 2, 2).unfold(3, 4, 4).unfold(4, 4, 4)  # (B, C, T', H', W', t, p, p)
    tubes = tubes.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(2, 2 * 2 * 2, -1)
    want = tubes @ emb.proj.weight.reshape(5, -1).T + emb.proj.bias
    torch.testing.assert_close(emb(x), want, atol=1e-5, rtol=1e-5)
    assert emb.grid_size == (2, 2, 2)
    with pytest.raises(ValueError, match=r"expected a video batch \(B, C, T, H, W\) = \(B, 3, 4, 8, 8\)"):
        emb(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="num_frames=5 must be a positive multiple of 2"):
        TubeletEmbed(8, 5, 4, 2)


def test_sincos_nd_is_sincos_2d_on_images_and_per_axis_on_volumes():
    torch.testing.assert_close(sincos_nd((3, 5), 16), sincos_2d((3, 5), 16), atol=0, rtol=0)
    t, h, w, d = 2, 3, 4, 12
    pe = sincos_nd((t, h, w), d).view(t, h, w, d)
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    for (i, j, k) in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        want = torch.cat([torch.cat([(c * omega).sin(), (c * omega).cos()]) for c in (k, j, i)])  # w, h, t
        torch.testing.assert_close(pe[i, j, k], want.float())
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_nd((2, 2, 2), 8)


@pytest.mark.parametrize("axes", [(0,), (1, 2), (2,)])
def test_axial_attention_equals_attention_within_each_group_by_brute_force(axes):
    torch.manual_seed(0)
    grid = (2, 3, 4)
    attn = MultiHeadAttention(8, 2, grouping=("axial", dict(axes=axes)), layout=TokenLayout(grid)).eval()
    x = torch.randn(2, math.prod(grid), 8)
    got = attn(x)
    plain = MultiHeadAttention(8, 2).eval()
    plain.load_state_dict(attn.state_dict())
    xs, want = x.view(2, *grid, 8), torch.empty(2, *grid, 8)
    for idx in torch.cartesian_prod(*[torch.arange(grid[a]) for a in range(3) if a not in axes]).view(
            -1, 3 - len(axes)).tolist():
        sel = [slice(None)] * 3
        for a, v in zip([a for a in range(3) if a not in axes], idx):
            sel[a] = v
        group = xs[(slice(None), *sel)]  # tokens that differ only along `axes`
        out = plain(group.reshape(2, -1, 8)).reshape(group.shape)
        want[(slice(None), *sel)] = out
    torch.testing.assert_close(got, want.view(2, -1, 8), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot place 1 prefix"):
        MultiHeadAttention(8, 2, grouping=("axial", dict(axes=axes)), layout=TokenLayout(grid, 1))


def _count_vit_block(d, mlp=4):
    return (3 * d * d + 3 * d) + (d * d + d) + (mlp * d * d + mlp * d) + (mlp * d * d + d) + 4 * d


@pytest.mark.parametrize("name, extra", [("vivit_base_st", 0), ("vivit_base_fsa", 1), ("vivit_base_fe", 2)])
def test_vivit_base_parameter_counts_by_closed_form(name, extra):
    """ViViT-B (ViT-B widths, 32 x 224 x 224, tubelet 2 x 16 x 16, 400 classes) counted part by part:
    model 1 = tubelet conv + class token + position table + 12 ViT-B blocks + norm + head; model 3 adds a
    spatial attention + LayerNorm per layer and has no class token; model 2 adds 4 temporal blocks, a
    temporal class token and the spatial encoder's final norm, and its spatial tokens carry the frames'
    class token (one shared parameter)."""
    d, n = 768, 16 * 14 * 14
    stem, head = 3 * 2 * 16 * 16 * d + d, 2 * d + d * 400 + 400
    attn_only = 4 * d * d + 4 * d + 2 * d
    want = {0: stem + d + (n + 1) * d + 12 * _count_vit_block(d) + head,
            1: stem + n * d + 12 * (_count_vit_block(d) + attn_only) + head,
            2: stem + n * d + d + 16 * _count_vit_block(d) + 2 * d + d + head}[extra]
    with torch.device("meta"):
        m = vitlab.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == want


def test_factorised_self_attention_alternates_spatial_and_temporal_blocks_and_mixes_only_along_them():
    torch.manual_seed(0)
    m = vitlab.create_model("vivit_base_fsa", depth=2, **SMALL).eval()
    kinds = [(b.attn.grouping.axes, b.mlp is not None) for b in m.blocks]
    assert kinds == [((1, 2), False), ((0,), True)] * 2 and m.cls_token is None and m.global_pool == "avg"
    # after the first (spatial) block, temporal index 0 does not see a change in the last frames
    x, y = _video(), _video()
    y[:, :, 2:] += 1.0
    first = lambda v: m.forward_intermediates(v, indices=[0], intermediates_only=True)[0]  # noqa: E731
    a, b = first(x), first(y)
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0])
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-3
    assert (m.forward_intermediates(x, indices=[1], intermediates_only=True)[0][:, :, 0]
            - m.forward_intermediates(y, indices=[1], intermediates_only=True)[0][:, :, 0]).abs().max() > 1e-3


def test_factorised_encoder_keeps_frames_apart_until_the_temporal_encoder():
    torch.manual_seed(0)
    m = vitlab.create_model("vivit_base_fe", depth=2, temporal_depth=1, **SMALL).eval()
    x, y = _video(), _video()
    y[:, :, 2:] += 1.0
    (sa, ta), (sb, tb) = (m.forward_intermediates(v, intermediates_only=True) for v in (x, y))
    assert sa.shape == (2, 24, 2, 1 + 16) and ta.shape == (2, 24, 2)  # (T', class token + H'W'), then (T',)
    torch.testing.assert_close(sa[:, :, 0], sb[:, :, 0])  # frame 0's tokens, class token included
    assert (ta[:, :, 0] - tb[:, :, 0]).abs().max() > 1e-3  # the temporal encoder mixes the frames
    logits = m(x)
    torch.testing.assert_close(logits, m.forward_head(m.forward_features(x)))
    assert logits.shape == (2, 5)


@pytest.mark.parametrize("name", ["vivit_base_st", "vivit_base_fsa", "vivit_base_fe", "vit3d_small_patch16"])
def test_video_models_train_step_and_record_attention(name):
    from vitlab.layers import record_attention

    kw = dict(SMALL, depth=1, **({"temporal_depth": 1} if name.endswith("fe") else {}))
    if name.startswith("vit3d"):
        kw.update(in_chans=1, tubelet_size=4)
    m = vitlab.create_model(name, **kw)
    x = _video(c=m.in_chans)
    m(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with record_attention(m) as rec, torch.no_grad():
        m(x)
    for p in rec.last().values():
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]))
    assert m.default_cfg["input_size"] == (m.in_chans, 4, 16, 16)
