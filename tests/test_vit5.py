"""ViT-5 (Wang et al., 2026): vitlab's recipe against an independent forward written from the paper and the
official ``models_vit5.py`` (registers appended after the patches, their own 2 x 2 RoPE with base 100, the class
token not rotated, RMS QK-norm per head, LayerScale), parameter counts against the official architecture, and the
official checkpoint layout loading from disk."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab

from vitlab.models.factory import create_model
from vitlab.models.vit5 import vit5_from_official


def _official_count(dim: int, depth: int, heads: int, tokens: int = 196, regs: int = 4, classes: int = 1000) -> int:
    """Parameters of the official ``vit_models`` with ViT-5's flags, summed layer by layer."""
    block = (3 * dim * dim  # qkv, no bias
             + dim * dim + dim  # proj
             + 2 * dim // heads  # q_norm, k_norm (RMSNorm weights over a head)
             + 2 * (dim * 4 * dim) + 4 * dim + dim  # mlp fc1, fc2
             + 2 * dim  # norm1, norm2 (RMSNorm weights)
             + 2 * dim)  # gamma_1, gamma_2
    embed = 3 * 16 * 16 * dim + dim
    return depth * block + embed + dim * (1 + regs + tokens) + dim + dim * classes + classes


@pytest.mark.parametrize("name,size", [("vit5_small", (384, 12, 6)), ("vit5_base", (768, 12, 12)),
                                       ("vit5_large", (1024, 24, 16)), ("vit5_xlarge", (1152, 28, 16))])
def test_parameter_count_is_the_official_one(name, size):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == _official_count(*size)


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(t, side, theta):
    """The official VisionRotaryEmbedding on ``t (B, side*side, H, d)``: first half of the channels turned by the
    row, second half by the column, interleaved pairs ``(2i, 2i+1)``."""
    d = t.shape[-1]
    freqs = theta ** (-torch.arange(0, d // 2, 2).float() / (d // 2))  # d/4 frequencies
    pos = torch.arange(side) / side * side
    f = (pos[:, None] * freqs).repeat_interleave(2, dim=-1)  # (side, d/2)
    ang = torch.cat([f[:, None].expand(side, side, -1), f[None].expand(side, side, -1)], -1).reshape(-1, 1, d)
    pairs = t.unflatten(-1, (-1, 2))
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return t * ang.cos() + rot * ang.sin()


def _official_forward(sd, img, heads, patch, regs=4):
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    b, n, dim = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x, sd["reg_token"].expand(b, -1, -1)], 1)
    side, d = int(math.isqrt(n)), dim // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = _rms(x, p("norm1.weight"))
        q, k, v = (h @ p("attn.qkv.weight").T).reshape(b, -1, 3, heads, d).unbind(2)
        q, k = _rms(q, p("attn.q_norm.weight")), _rms(k, p("attn.k_norm.weight"))
        q, k = ([t[:, :1], _rope(t[:, 1:1 + n], side, 10000.0), _rope(t[:, 1 + n:], int(math.isqrt(regs)), 100.0)]
                for t in (q, k))
        q, k = torch.cat(q, 1), torch.cat(k, 1)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(d ** -0.5).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, -1, dim)
        x = x + p("gamma_1") * (o @ p("attn.proj.weight").T + p("attn.proj.bias"))
        h = _rms(x, p("norm2.weight"))
        h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        x = x + p("gamma_2") * h
    return _rms(x, sd["norm.weight"])[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def _official_state(seed=0, **kw):
    """A small ViT-5 with every parameter random, and its state dict in the official layout."""
    torch.manual_seed(seed)
    model = create_model("vit5_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         num_classes=5, **kw).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn_like(prm) * 0.5 + (1.0 if prm.dim() == 1 and prm.numel() <= 32 else 0.0))
    sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in model.state_dict().items()}
    return model, sd


def test_forward_equals_the_official_computation():
    model, sd = _official_state()
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, ref = model(img), _official_forward(sd, img, heads=2, patch=8)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    # the registers' own rotation matters: without it the outputs differ
    plain, _ = _official_state(attn_position=(("rope", dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=4)),))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(img) - ref).abs().max() > 1e-3


def test_official_checkpoint_loads_from_disk(tmp_path):
    model, sd = _official_state(seed=1)
    path = tmp_path / "vit5_official.pth"
    torch.save({"model": sd}, path)
    loaded = vitlab.create_model("vit5_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          num_classes=5, checkpoint_path=str(path)).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(img), model(img))
    assert vit5_from_official({"blocks.3.gamma_2": 1})["blocks.3.ls2.gamma"] == 1


def test_recipe_parts_and_init():
    model = create_model("vit5_small", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, torch.nn.RMSNorm) and attn.qkv.bias is None and attn.proj.bias is not None
    assert torch.all(model.blocks[1].ls2.gamma == 1e-4) and isinstance(model.norm, torch.nn.RMSNorm)
    assert model.reg_token.shape == (1, 4, 32) and model.pos_embed.shape == (1, 16, 32)  # patches only
    assert 0.01 < model.reg_token.std() < 0.03 and 0.01 < model.cls_token.std() < 0.03  # trunc_normal(.02)


def test_bad_register_rope_and_qk_norm_are_refused():
    with pytest.raises(ValueError, match="rope_registers must be a square number"):
        create_model("vit5_small", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=3)
    with pytest.raises(ValueError, match="qk_norm must be a bool or a norm name"):
        create_model("vit5_small", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                     mixer_kwargs=dict(qk_norm="batch"))


README = dict(image_size=256, patch_size=16, num_classes=1000, dim=512, depth=6, heads=8, mlp_dim=1024,
              dim_head=64, dropout=0.1, emb_dropout=0.1, num_registers=4)


def test_vit_pytorch_readme_example_runs_with_only_the_import_changed():
    """vit-pytorch's README "ViT-5" config: the same output shape, and the parameter count differs by exactly the
    position rows vit-pytorch adds for the class token and the registers."""
    vp = pytest.importorskip("vit_pytorch.vit_5")
    from vitlab.compat.vit_pytorch.vit_5 import ViT

    with torch.device("meta"):
        ref, ours = vp.ViT(**README), ViT(**README)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref) - (1 + 4) * 512
    small = dict(README, image_size=32, patch_size=8, dim=32, heads=2, dim_head=16, mlp_dim=64, num_classes=7)
    img = torch.randn(2, 3, 32, 32)
    assert ViT(**small).eval()(img).shape == vp.ViT(**small).eval()(img).shape == (2, 7)
    with pytest.raises(ValueError, match="rope_registers must be a square number"):
        ViT(**dict(small, num_registers=2))


def test_register_rope_without_registers_is_a_clear_error():
    from vitlab.models.vit import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                              attn_position=(("rope", dict(rope_registers=4)),))  # class token only: 1 prefix token
    with pytest.raises(ValueError, match="rope_registers=4 needs 4 register tokens in every attention group"):
        model(torch.randn(1, 3, 32, 32))


def test_rms_norm_under_autocast_runs_in_float32_without_the_fallback_warning():
    """The ``rms`` norm (ViT-5's every norm and QK-norm) under bf16 autocast: float32 output equal to
    ``rms_norm`` of the bf16 input in float32 (as autocast treats LayerNorm), and no "cannot dispatch to fused
    implementation" warning; a bf16 model keeps bf16."""
    import warnings

    from vitlab.layers.norm import create_norm

    norm = create_norm("rms", 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
    want = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert norm.bfloat16()(x).dtype == torch.bfloat16
