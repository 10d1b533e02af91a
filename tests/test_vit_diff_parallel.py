"""timm's differential-attention and parallel-scaling register ViTs (issue 14): ``vit_dwee``, ``vit_dlittle``,
``vit_pwee``, ``vit_dpwee`` (``*_patch16_reg1_gap_256``).

The core ``differential`` ("Differential Transformer", Ye et al., ICLR 2025, sec. 2) is checked against the
paper's formula written out with einsum and against timm's ``DiffAttention`` (both of its paths); the wiring
``parallel_scaling`` (ViT-22B, Dehghani et al., ICML 2023, sec. 2) against its equation; the four models against
timm (parameter counts and shapes at the default size on ``meta``, logits both ways with every parameter
randomised); the core in a hierarchical backbone (Swin: fused and explicit paths agree under the shifted-window
mask and the relative bias, and a training step reaches every parameter) and its refusals."""
import math

import pytest
import torch

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from parity import check_parity, randomize_

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["vit_dwee_patch16_reg1_gap_256", "vit_dlittle_patch16_reg1_gap_256", "vit_pwee_patch16_reg1_gap_256",
         "vit_dpwee_patch16_reg1_gap_256"]


def _randomised_attention(layer_index: int) -> MultiHeadAttention:
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 2, core=("differential", dict(layer_index=layer_index)), qkv_bias=True).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
        attn.sub_norm.weight.uniform_(0.5, 1.5)
    return attn


def _by_hand(attn, x, lambda_init):
    """Ye et al. (2025), eqs. 1-3 written out: per head, ``[Q1; Q2]`` and ``[K1; K2]`` halves of width ``d``,
    ``(softmax(Q1 K1^T / sqrt d) - lambda softmax(Q2 K2^T / sqrt d)) V``, RMSNorm over the head's ``2d`` channels,
    times ``1 - lambda_init``, heads concatenated, output projection.  Returns (output, differential map)."""
    b, n, c = x.shape
    h = attn.num_heads
    d = c // h // 2
    qkv = torch.einsum("bnc,oc->bno", x, attn.qkv.weight) + attn.qkv.bias
    q, k, v = qkv.reshape(b, n, 3, h, 2 * d).unbind(2)
    a1 = torch.einsum("bihe,bjhe->bhij", q[..., :d], k[..., :d]).div(math.sqrt(d)).softmax(-1)
    a2 = torch.einsum("bihe,bjhe->bhij", q[..., d:], k[..., d:]).div(math.sqrt(d)).softmax(-1)
    lam = (torch.exp(torch.dot(attn.lambda_q1, attn.lambda_k1)) - torch.exp(torch.dot(attn.lambda_q2, attn.lambda_k2))
           + lambda_init)
    amap = a1 - lam * a2
    o = torch.einsum("bhij,bjhe->bihe", amap, v)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.sub_norm.weight * (1 - lambda_init)
    return torch.einsum("bnc,oc->bno", o.reshape(b, n, c), attn.proj.weight) + attn.proj.bias, amap


def test_differential_core_is_the_papers_formula_on_both_paths():
    attn = _randomised_attention(layer_index=2)
    x, lay = torch.randn(2, 17, 32), TokenLayout((4, 4), 1)
    with torch.no_grad():
        want, amap = _by_hand(attn, x, 0.8 - 0.6 * math.exp(-0.3 * 2))  # l - 1 = 2: the third block
        torch.testing.assert_close(attn(x, lay), want, rtol=1e-5, atol=1e-5)  # fused (SDPA, twice)
        with record_attention(attn) as rec:
            explicit = attn(x, lay)
    torch.testing.assert_close(explicit, want, rtol=1e-5, atol=1e-5)
    (recorded,) = rec.last().values()
    torch.testing.assert_close(recorded, amap, rtol=1e-5, atol=1e-6)
    lam = float(recorded[0, 0, 0].sum())  # rows sum to 1 - lambda: a difference of two maps, not a distribution
    torch.testing.assert_close(recorded.sum(-1), torch.full_like(recorded.sum(-1), lam))
    assert abs(lam - 1) > 0.05


@pytest.mark.parametrize("fused", [True, False])
def test_differential_core_equals_timm_diff_attention(fused):
    from timm.layers import DiffAttention

    ref = DiffAttention(32, 2, qkv_bias=True, depth=5).eval()
    ref.fused_attn = fused
    randomize_(ref, seed=3)
    ours = MultiHeadAttention(32, 2, core=("differential", dict(layer_index=5)), qkv_bias=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.lambda_init == ref.lambda_init
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, TokenLayout((3, 3), 1)), ref(x), rtol=1e-5, atol=1e-5)


def test_lambda_init_follows_block_depth_as_timm():
    kw = dict(img_size=32, depth=4, embed_dim=32, num_heads=2)
    for name, attn_of in (("vit_dwee_patch16_reg1_gap_256", lambda b: b.attn),
                          ("vit_dpwee_patch16_reg1_gap_256", lambda b: b)):
        ours = [blk.attn.lambda_init for blk in vitlab.create_model(name, **kw).blocks]
        theirs = [attn_of(blk).lambda_init for blk in timm.create_model(name, **kw).blocks]
        assert ours == pytest.approx(theirs)
        assert ours == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * i) for i in range(4)])
    fixed = vitlab.create_model("vit_dwee_patch16_reg1_gap_256", **kw, mixer_kwargs=dict(lambda_init=0.5))
    assert [blk.attn.lambda_init for blk in fixed.blocks] == [0.5] * 4
    # any family built by name numbers its differential attentions in block order (here Swin's 2 + 2 blocks)
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", core="differential", img_size=32, embed_dim=16,
                               depths=(2, 2), num_heads=(2, 2), window_size=2)
    inits = [m.lambda_init for m in swin.modules() if getattr(m, "core", None).__class__.__name__ == "DifferentialCore"]
    assert inits == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * i) for i in range(4)])


def test_differential_core_refusals():
    with pytest.raises(ValueError, match="head_dim must be even, got 3"):
        MultiHeadAttention(6, 2, core="differential")
    with pytest.raises(ValueError, match=r"lambda_init must be in \[0, 1\).*got 1.5"):
        MultiHeadAttention(8, 2, core="differential", lambda_init=1.5)
    with pytest.raises(ValueError, match="layer_index must be an int >= 0.*got -1"):
        MultiHeadAttention(8, 2, core="differential", layer_index=-1)
    with pytest.raises(ValueError, match="core 'differential' cannot be combined with modifier 'talking_heads'"):
        vitlab.create_model("vit_tiny_patch4_32", depth=1, embed_dim=32, num_heads=2, core="differential",
                            modifiers=("talking_heads",))


@pytest.mark.parametrize("name", NAMES)
def test_default_size_counts_and_shapes_equal_timm(name):
    with torch.device("meta"):
        ours, ref = vitlab.create_model(name), timm.create_model(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in to_timm_state_dict(ours).items()} == want
    cfg, ref_cfg = ours.default_cfg, ref.pretrained_cfg
    for key in ("input_size", "num_classes", "crop_pct", "interpolation"):
        assert cfg[key] == ref_cfg[key], key
    assert cfg["mean"] == pytest.approx(ref_cfg["mean"]) and cfg["std"] == pytest.approx(ref_cfg["std"])


@pytest.mark.parametrize("name, kw", [
    ("vit_dwee_patch16_reg1_gap_256", dict(img_size=32, embed_dim=64, num_heads=2)),
    ("vit_dlittle_patch16_reg1_gap_256", dict(img_size=32, embed_dim=80, num_heads=5)),
    ("vit_pwee_patch16_reg1_gap_256", dict(img_size=32, embed_dim=64, num_heads=2)),
    ("vit_dpwee_patch16_reg1_gap_256", dict(img_size=32, embed_dim=64, num_heads=2)),
])
def test_parity_with_timm_every_parameter_randomised(name, kw):
    """Logits and block maps equal to timm's both ways (3 blocks: three different lambda_init)."""
    check_parity(name, depth=3, **kw)


def test_parallel_scaling_block_is_one_norm_and_one_scale_over_both_branches():
    torch.manual_seed(0)
    m = vitlab.create_model("vit_pwee_patch16_reg1_gap_256", img_size=32, depth=1, embed_dim=32, num_heads=2).eval()
    randomize_(m, seed=1)
    blk, lay = m.blocks[0], TokenLayout((2, 2), 1)
    assert not hasattr(blk, "norm2") and not hasattr(blk, "ls2")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        n = torch.nn.functional.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        want = x + blk.ls1.gamma * (blk.attn(n, lay) + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(n))))
        torch.testing.assert_close(blk(x, lay), want)
    # the fused in-projection of timm holds [fc1 | q | k | v]; the round trip is exact
    sd = m.state_dict()
    back = timm.create_model("vit_pwee_patch16_reg1_gap_256", img_size=32, depth=1, embed_dim=32, num_heads=2)
    back.load_state_dict(to_timm_state_dict(m), strict=True)
    assert torch.equal(back.blocks[0].in_proj.weight[:160], sd["blocks.0.mlp.fc1.weight"])
    again = vitlab.create_model("vit_pwee_patch16_reg1_gap_256", img_size=32, depth=1, embed_dim=32, num_heads=2)
    load_timm_weights(again, back.state_dict())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())
    halves = m.forward_halves(torch.randn(2, 3, 32, 32))  # no map between the branches: one entry per block
    assert [h.name for h in halves if h.name.startswith("blocks")] == ["blocks.0"]
    with pytest.raises(ValueError, match="parallel_scaling.*no MLP"):
        from vitlab.models.block import Block
        Block(32, blk.attn, None, wiring="parallel_scaling")


def test_differential_core_in_swin_fused_equals_explicit_and_trains(monkeypatch):
    """Swin's shifted windows: the relative bias and the window mask broadcast over both logit maps."""
    import vitlab.layers.mha as mha

    kw = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=2, num_classes=10)
    torch.manual_seed(0)
    m = vitlab.create_model("swin_tiny_patch4_window7_224", core="differential", **kw)
    randomize_(m, seed=2)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        with record_attention(m) as rec:
            explicit = m(x)
        monkeypatch.setattr(mha, "EXPLICIT_BIAS_LOGITS", 0)  # SDPA with the bias, on the CPU too
        fused = m(x)
    assert len(rec.last()) == 4
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-4)
    m.train()
    m(x).square().mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert float(m.layers[0].blocks[0].attn.lambda_q1.grad.abs().sum()) > 0


@torch.no_grad()
def test_memory_readout_applies_the_differential_output_step():
    """Without memory tokens, the memory adapter's readout over a block's own tokens is that block's attention:
    it must apply the core's sub-norm and (1 - lambda_init) scale too."""
    from vitlab.layers.memory import MemoryReadout

    attn = _randomised_attention(layer_index=2).eval()
    x = torch.randn(2, 9, attn.dim)
    torch.testing.assert_close(MemoryReadout(attn.dim, 0)(attn, x, x), attn(x, TokenLayout((3, 3))))
