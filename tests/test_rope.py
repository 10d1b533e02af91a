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
