"""Axial 2-D RoPE (position part ``rope``): the relative property by brute force, the rotation against complex
multiplication, the q/k hook of MultiHeadAttention against an explicit computation, refusals."""
import itertools

import pytest
import torch

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.rope import axial_angles, rotate_pairs


def _rotated(vec, pos_index, grid, d):
    """``vec (d,)`` as if placed at grid token ``pos_index``, rotated."""
    t = vec.expand(grid[0] * grid[1], d).clone()
    return rotate_pairs(t, axial_angles(grid, d))[pos_index]


def test_rotated_dot_product_depends_only_on_the_relative_offset():
    torch.manual_seed(0)
    grid, d = (4, 5), 8
    a, b = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    by_offset = {}
    for m, n in itertools.product(range(20), repeat=2):
        off = (m // 5 - n // 5, m % 5 - n % 5)
        dot = float(_rotated(a, m, grid, d) @ _rotated(b, n, grid, d))
        by_offset.setdefault(off, []).append(dot)
    assert all(max(v) - min(v) < 1e-5 for v in by_offset.values())  # float32 angles
    values = [v[0] for v in by_offset.values()]
    assert max(values) - min(values) > 0.1  # the dot product does depend on the offset


def test_rotation_is_complex_multiplication_x_then_y():
    grid, d = (3, 4), 8
    t = torch.randn(12, d, dtype=torch.float64)
    freqs = 100.0 ** (-torch.arange(2, dtype=torch.float64) / 2)  # Heo et al.: theta = 100, d/4 per axis
    ys, xs = torch.arange(12) // 4, torch.arange(12) % 4
    angle = torch.cat([xs[:, None] * freqs, ys[:, None] * freqs], 1)  # first d/4 pairs: x; next d/4: y
    z = torch.view_as_complex(t.reshape(12, d // 2, 2)) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(rotate_pairs(t, axial_angles(grid, d).double()), torch.view_as_real(z).reshape(12, d))


def test_attention_with_rope_equals_explicit_rotated_attention_and_keeps_prefix():
    torch.manual_seed(0)
    layout = TokenLayout((3, 3), 1)
    attn = MultiHeadAttention(16, 2, position=("rope",), layout=layout)
    x = torch.randn(2, 10, 16)
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ang = axial_angles((3, 3), 8)
    q = torch.cat([q[:, :, :1], rotate_pairs(q[:, :, 1:], ang)], 2)  # the class token is not rotated
    k = torch.cat([k[:, :, :1], rotate_pairs(k[:, :, 1:], ang)], 2)
    p = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
    want = attn.proj((p @ v).transpose(1, 2).reshape(2, 10, 16))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
    with record_attention(attn) as rec:  # explicit path = fused path
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(next(iter(rec.last().values())), p, atol=1e-5, rtol=1e-5)


def test_rope_in_backbones_and_refusals():
    m = vitlab.create_model("vit_tiny_patch4_32", depth=2, embed_dim=32, num_heads=2, attn_position=("rope",),
                            pos_embed="none")
    x = torch.randn(2, 3, 32, 32)
    m(x).square().mean().backward()
    assert not any(k for k in m.state_dict() if "rope" in k)  # no tensors of its own
    windowed = MultiHeadAttention(16, 2, grouping="window", window_size=2, position=("rope",),
                                  layout=TokenLayout((4, 4)))
    assert torch.isfinite(windowed(torch.randn(1, 16, 16))).all()  # window-local positions
    with pytest.raises(ValueError, match="position bias 'rope' cannot be combined with core 'focused_linear'"):
        vitlab.create_model("vit_tiny_patch4_32", depth=1, mixer="focused_linear", attn_position=("rope",))
    with pytest.raises(ValueError, match="grouping 'class_query'"):
        MultiHeadAttention(16, 2, grouping="class_query", position=("rope",), layout=TokenLayout((2, 2), 1))
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        MultiHeadAttention(12, 2, position=("rope",), layout=TokenLayout((2, 2)))
    with pytest.raises(ValueError, match="rope_theta must be > 1"):
        MultiHeadAttention(16, 2, position=(("rope", {"rope_theta": 0.5}),), layout=TokenLayout((2, 2)))


def _swin_window_attention(shifted: bool):
    """A randomised 4x4-window attention of a small Swin built with ``attn_position=("rope",)`` on an 8x8 map
    (block 1: shifted by 2), in float64."""
    from parity import randomize_

    torch.manual_seed(0)
    model = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=32, depths=(2,),
                                num_heads=(2,), window_size=4, num_classes=10, attn_position=("rope",))
    randomize_(model)
    return model.layers[0].blocks[int(shifted)].attn.double().eval()


def test_swin_rope_rotates_by_window_local_coordinates_explicit_einsum():
    """Shifted-window attention with rope: each window's probabilities are softmax(rot(q) . rot(k) / sqrt(d) +
    relative bias + shift mask), q and k rotated by each token's (row, col) inside its 4x4 window (complex
    multiplication, x pairs first), the window cut from the map rolled by -2 (Swin's cyclic shift)."""
    attn = _swin_window_attention(shifted=True)
    heads, d, ws, sh, c = 2, 16, 4, 2, 32
    x = torch.randn(2, 64, c, dtype=torch.float64)
    xm = x.view(2, 8, 8, c).roll((-sh, -sh), (1, 2))
    win = xm.view(2, 2, ws, 2, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(8, ws * ws, c)  # windows in raster order
    q, k, v = torch.nn.functional.linear(win, attn.qkv.weight, attn.qkv.bias).view(8, 16, 3, heads, d).permute(
        2, 0, 3, 1, 4)
    row, col = torch.arange(16) // ws, torch.arange(16) % ws  # inside the window
    freqs = 100.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    angle = torch.cat([col[:, None] * freqs, row[:, None] * freqs], 1)
    turn = torch.polar(torch.ones_like(angle), angle)

    def rot(t):
        return torch.view_as_real(torch.view_as_complex(t.reshape(*t.shape[:-1], d // 2, 2).contiguous()) * turn
                                  ).flatten(-2)

    logits = torch.einsum("bhqd,bhkd->bhqk", rot(q), rot(k)) * d ** -0.5
    off = (row[:, None] - row[None] + ws - 1) * (2 * ws - 1) + (col[:, None] - col[None] + ws - 1)
    logits = logits + attn.relative_position_bias_table[off].permute(2, 0, 1)  # Swin's table, (h, 16, 16)
    region = torch.zeros(8, 8, dtype=torch.long)  # Swin's shift mask: tokens of different regions never attend
    for i, rs in enumerate((slice(0, -ws), slice(-ws, -sh), slice(-sh, None))):
        for j, cs in enumerate((slice(0, -ws), slice(-ws, -sh), slice(-sh, None))):
            region[rs, cs] = 3 * i + j
    rw = region.view(2, ws, 2, ws).permute(0, 2, 1, 3).reshape(4, 16)
    blocked = (rw[:, :, None] != rw[:, None, :]).repeat(2, 1, 1)[:, None]  # (8 windows, 1, 16, 16)
    probs = logits.masked_fill(blocked, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(2, 2, 2, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, c)
    want = attn.proj(out.roll((sh, sh), (1, 2)).reshape(2, 64, c))
    layout = TokenLayout((8, 8))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, layout), want)
        with record_attention(attn) as rec:
            torch.testing.assert_close(attn(x, layout), want)
    torch.testing.assert_close(next(iter(rec.last().values())), probs, atol=1e-6, rtol=0)  # float32 angles


def test_swin_rope_windows_with_the_same_tokens_attend_alike():
    """Window-local coordinates: the same 16 tokens in two windows give the same attention map (with the map's
    coordinates they would not: rope makes the logits depend on the offset between positions only)."""
    attn = _swin_window_attention(shifted=False)
    x = torch.randn(1, 8, 8, 32, dtype=torch.float64)
    x[:, 4:, 4:] = x[:, :4, :4]  # window 3 = window 0
    with torch.no_grad(), record_attention(attn) as rec:
        attn(x.view(1, 64, 32), TokenLayout((8, 8)))
    p = next(iter(rec.last().values()))
    torch.testing.assert_close(p[3], p[0], atol=1e-12, rtol=0)
    assert (p[1] - p[0]).abs().max() > 1e-3  # other tokens, another map


def test_rope_is_refused_where_tokens_have_no_common_grid():
    """NaViT's packed rows (a 1-D sequence of several images) and ViViT's factorised encoder (a frame's class token
    and raster-ordered patches as one axis) would rotate by sequence indices, not image coordinates: refused."""
    navit = vitlab.create_model("navit_tiny_patch4", img_size=32, depth=1, embed_dim=32, num_heads=2,
                                attn_position=("rope",))
    assert navit(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # a (B, C, H, W) batch has its 2-D grid
    with pytest.raises(ValueError, match=r"built for groups on a 2-D grid; these tokens lie on a 1-D grid"):
        navit([torch.randn(3, 16, 32), torch.randn(3, 32, 16)])
    with pytest.raises(ValueError, match=r"attn_position=\('rope',\) needs groups on a token grid"):
        vitlab.create_model("vivit_base_fe", img_size=16, num_frames=4, patch_size=4, depth=1, temporal_depth=1,
                            embed_dim=24, num_heads=2, num_classes=10, attn_position=("rope",))
