"""Tests written for the survivors of the fifth mutation-testing pass (README, "Mutation testing") over
``layers/linear.py``, ``bidirectional.py``, ``rope.py`` and ``inplace.py``: where the oneDNN linear path must stay off (turned back
on, ``torch.func.vmap``, tensor subclasses, ``torch.jit.trace``, dynamo), the defaults and ``qkv_bias=False`` of
LookupViT's bidirectional cross-attention, and RoPE on a 3-D grid, in bfloat16 and at the bounds of its options,
and ``conv_bn_act`` wherever it must run the modules themselves (training BN, untracked statistics, hooks, conv
subclasses), each against an independent float64 computation."""
import gc
import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from test_linear import ONEDNN, _fp32_close, _ops
from torch import nn

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout
from vitlab.layers.bidirectional import BidirectionalCrossAttention
from vitlab.layers.inplace import conv_bn_act
from vitlab.layers import linear as linear_mod
from vitlab.layers.linear import Linear, clear_bf16_weights, linear_act, onednn_linear_enabled, set_onednn_linear

pytestmark = pytest.mark.usefixtures("one_thread")
needs_onednn = pytest.mark.skipif(not onednn_linear_enabled(), reason="this PyTorch build has no oneDNN linear")
needs_bf16 = pytest.mark.skipif(not (onednn_linear_enabled() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                reason="no oneDNN bf16 on this CPU")


def _close64(got, x, lin):
    """``got`` equals ``F.linear`` in float64 to float32 accuracy (any summation order)."""
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    return got.shape == ref.shape and _fp32_close(got, ref, x.shape[-1])


# ----------------------------------------------------------------------------------------------- oneDNN linear
@needs_onednn
def test_set_onednn_linear_turns_the_path_off_and_on_again():
    lin, x = Linear(16, 8), torch.randn(4, 16)
    previous = set_onednn_linear(False)
    try:
        with torch.no_grad():
            out, ops = _ops(lambda: lin(x))
        assert ONEDNN not in ops and not onednn_linear_enabled() and _close64(out, x, lin)
        assert set_onednn_linear(True) is False and onednn_linear_enabled()
        with torch.no_grad():
            out, ops = _ops(lambda: lin(x))
        assert ONEDNN in ops and _close64(out, x, lin)
    finally:
        set_onednn_linear(previous)


@needs_onednn
def test_vmap_takes_the_plain_op():
    """Under ``torch.func.vmap`` (no autograd) the oneDNN op has no batching rule: the plain op, per-sample 2-D."""
    lin, x = Linear(16, 8), torch.randn(3, 5, 16)
    with torch.no_grad():
        out, ops = _ops(lambda: torch.func.vmap(lin)(x))
    assert ONEDNN not in ops and _close64(out, x, lin)


@needs_onednn
def test_tensor_subclass_sees_f_linear():
    """A ``__torch_function__`` subclass (quantisation wrappers, metadata tensors) is handed ``F.linear``."""
    class Seen(torch.Tensor):
        funcs = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.funcs.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    lin, x = Linear(16, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        out = lin(x.as_subclass(Seen))
    assert "linear" in Seen.funcs and "_linear_pointwise" not in Seen.funcs
    assert type(out) is Seen and _close64(out.as_subclass(torch.Tensor), x, lin)


@needs_onednn
def test_jit_trace_and_dynamo_record_the_portable_op():
    lin, x = Linear(16, 8), torch.randn(3, 16)
    with torch.no_grad():
        traced = torch.jit.trace(lin, x)
    graph = str(traced.graph)
    assert "mkldnn" not in graph and "aten::linear" in graph
    x2 = torch.randn(6, 16)
    with torch.no_grad():
        assert _close64(traced(x2), x2, lin)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(lin, backend=capture)(x2)
    assert graphs and not any("mkldnn" in g for g in graphs) and _close64(out, x2, lin)
    torch._dynamo.reset()


def _bf16_reference(x, lin):
    """Autocast's arithmetic in float64: bf16-rounded inputs, exact sums."""
    def r(t):
        return None if t is None else t.detach().bfloat16().double()  # no graph holding the weight

    return F.linear(r(x), r(lin.weight), r(lin.bias))


@needs_bf16
def test_bf16_autocast_leaves_weights_of_other_dtypes_to_autocast():
    """Under bf16 autocast only float32 weights get a kept bf16 copy; a bf16 weight (a model cast with
    ``.bfloat16()``) takes autocast's plain op, and no copy of it is kept."""
    clear_bf16_weights()
    x, lin = torch.randn(3, 5, 16), Linear(16, 8, bias=False).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _ops(lambda: lin(x))
    ref = _bf16_reference(x, lin)
    assert ONEDNN not in ops and out.dtype == torch.bfloat16 and len(linear_mod._bf16_weights) == 0
    assert (out.double() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


@needs_bf16
def test_a_bias_of_another_dtype_is_left_to_autocast():
    """A float64 bias next to a float32 weight: under bf16 autocast ``F.linear`` refuses the mix (autocast does not
    cast float64); the fast path must not quietly cast it, and ``linear_act`` leaves the layer to the caller."""
    lin, x = Linear(16, 8), torch.randn(3, 16)
    lin.bias.data = lin.bias.data.double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="dtype"):
            F.linear(x, lin.weight, lin.bias)  # the reference: autocast's own rule
        with pytest.raises(RuntimeError, match="dtype"):
            lin(x)
        assert linear_act(lin, nn.GELU(), x) is None


@needs_bf16
def test_clearing_the_bf16_copies_before_their_weight_goes_is_silent(monkeypatch):
    """``clear_bf16_weights()`` and then the weight freed: the copy's finaliser finds nothing and says nothing."""
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    clear_bf16_weights()
    lin, x = Linear(16, 8), torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _ops(lambda: lin(x))
    ref = _bf16_reference(x, lin)
    assert ONEDNN in ops and (out.double() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()
    assert clear_bf16_weights() == 1
    del lin
    gc.collect()
    assert raised == [] and len(linear_mod._bf16_weights) == 0


# ------------------------------------------------------------------------------- bidirectional cross-attention
def _mhbc_explicit(att, xp, xl, h):
    """Gathering and propagation written out with einsum in float64 (biases where the module has them)."""
    def lin(m, t):
        return F.linear(t.double(), m.weight.double(), None if m.bias is None else m.bias.double())

    def heads(t):
        return t.reshape(*t.shape[:2], h, -1)

    q, k, v, vr = heads(lin(att.q, xp)), heads(lin(att.k, xl)), heads(lin(att.v, xl)), heads(lin(att.v_rev, xp))
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    gather = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).flatten(2)
    back = torch.einsum("bhji,bjhd->bihd", logits.softmax(-2), vr).flatten(2)
    return lin(att.proj, gather), lin(att.proj_rev, back)


def test_mhbc_defaults_are_eight_heads_with_qkv_bias_and_no_dropout():
    att = BidirectionalCrossAttention(64).train()  # train mode: any default dropout would act
    for p in att.parameters():
        p.data.normal_(0, 0.3)
    assert sum(p.numel() for p in att.parameters()) == 6 * 64 * 64 + 6 * 64
    xp, xl = torch.randn(2, 3, 64), torch.randn(2, 7, 64)
    g, back = _mhbc_explicit(att, xp, xl, 8)
    got, logits = att.gather(xp, xl)
    assert logits.shape == (2, 8, 3, 7)
    torch.testing.assert_close(got.double(), g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att.propagate(xp, logits).double(), back, atol=1e-5, rtol=1e-5)


def test_mhbc_without_qkv_bias():
    d = 32
    att = BidirectionalCrossAttention(d, 4, qkv_bias=False).eval()
    assert [m.bias is None for m in (att.q, att.k, att.v, att.v_rev, att.proj, att.proj_rev)] == [True] * 4 + [False] * 2
    assert sum(p.numel() for p in att.parameters()) == 6 * d * d + 2 * d
    xp, xl = torch.randn(2, 3, d), torch.randn(2, 5, d)
    g, back = _mhbc_explicit(att, xp, xl, 4)
    with torch.no_grad():
        got, logits = att.gather(xp, xl)
        torch.testing.assert_close(got.double(), g, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(att.propagate(xp, logits).double(), back, atol=1e-5, rtol=1e-5)
    small = dict(img_size=32, patch_size=4, embed_dim=d, depth=2, num_heads=2, compressed_size=3, num_classes=10)
    with torch.device("meta"):
        n = {b: sum(p.numel() for p in vitlab.create_model("lookupvit_base_patch16_224", **small, qkv_bias=b)
                    .parameters()) for b in (True, False)}
    assert n[True] - n[False] == 2 * (3 * d + 4 * d)  # per block: the compressed block's qkv, MHBC's q, k, v, v_rev


def test_mhbc_refusal_names_both_values():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        BidirectionalCrossAttention(30, 4)


# ------------------------------------------------------------------------------------------------------- rope
def _rope_attention_explicit(attn, x, grid, theta=100.0, order="xy", ref=None):
    """Global attention with q and k turned by complex multiplication in float64: pair block ``b`` of
    ``m = d / (2 rank)`` pairs uses axis ``b`` ("yx") or ``rank - 1 - b`` ("xy"), coordinate ``c`` (times
    ``ref / g``), frequency ``theta ** (-j / m)``."""
    b, n, c = x.shape
    h, rank = attn.num_heads, len(grid)
    d = c // h
    m = d // (2 * rank)
    coords = torch.tensor(list(itertools.product(*map(range, grid))), dtype=torch.float64)  # raster order
    if ref is not None:
        coords = coords / torch.tensor(grid, dtype=torch.float64) * torch.tensor(ref, dtype=torch.float64)
    axes = list(range(rank)) if order == "yx" else list(reversed(range(rank)))
    freqs = theta ** (-torch.arange(m, dtype=torch.float64) / m)
    angle = torch.cat([coords[:, a:a + 1] * freqs for a in axes], 1)  # (N, d/2)
    turn = torch.polar(torch.ones_like(angle), angle)
    w = {k: v.double() for k, v in attn.state_dict().items()}
    q, k, v = F.linear(x.double(), w["qkv.weight"], w.get("qkv.bias")).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)

    def rot(t):
        return torch.view_as_real(torch.view_as_complex(t.reshape(b, h, n, d // 2, 2).contiguous()) * turn).flatten(-2)

    p = (rot(q) @ rot(k).transpose(-2, -1) * d ** -0.5).softmax(-1)
    return F.linear((p @ v).transpose(1, 2).reshape(b, n, c), w["proj.weight"], w["proj.bias"])


def _rope_mha(dim, heads, grid, **opts):
    attn = MultiHeadAttention(dim, heads, position=(("rope", opts),), layout=TokenLayout(grid)).eval()
    for p in attn.parameters():  # biases too
        p.data.normal_(0, 0.3)
    return attn


@pytest.mark.parametrize("order", ["xy", "yx"])
def test_rope_on_a_3d_grid_splits_the_pairs_over_three_axes(order):
    grid = (2, 3, 2)
    attn = _rope_mha(24, 2, grid, rope_order=order)  # head_dim 12: 2 pairs per axis
    x = torch.randn(2, 12, 24)
    with torch.no_grad():
        torch.testing.assert_close(attn(x).double(), _rope_attention_explicit(attn, x, grid, order=order),
                                   atol=1e-5, rtol=1e-5)


def test_rope_theta_and_reference_grid_bounds():
    with pytest.raises(ValueError, match="rope_theta must be > 1, got 1.0"):
        _rope_mha(16, 2, (3, 3), rope_theta=1.0)
    x = torch.randn(2, 9, 16)
    for opts, theta, ref in [(dict(rope_theta=1.5), 1.5, None), (dict(rope_ref_grid=1), 100.0, (1, 1)),
                             (dict(rope_ref_grid=(1, 2)), 100.0, (1, 2))]:
        attn = _rope_mha(16, 2, (3, 3), **opts)
        with torch.no_grad():
            torch.testing.assert_close(attn(x).double(), _rope_attention_explicit(attn, x, (3, 3), theta, ref=ref),
                                       atol=1e-5, rtol=1e-5)


def test_rope_in_bfloat16_keeps_the_dtype():
    attn = _rope_mha(16, 2, (3, 3))
    x = torch.randn(2, 9, 16)
    want = _rope_attention_explicit(attn, x, (3, 3))
    with torch.no_grad():
        out = attn.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------------ conv_bn_act
class _StdConv(nn.Conv2d):
    """A conv subclass with its own forward (weight standardisation, as timm's ``StdConv2d``)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _conv_bn_parts(conv_cls=nn.Conv2d, **bn_kw):
    conv, bn = conv_cls(4, 6, 3, padding=1), nn.BatchNorm2d(6, eps=1e-3, **bn_kw)
    with torch.no_grad():
        for t in [conv.bias, bn.weight, bn.bias] + ([bn.running_mean] if bn.running_mean is not None else []):
            t.normal_()
        if bn.running_var is not None:
            bn.running_var.uniform_(0.5, 2.0)
    return conv, bn.eval(), nn.SiLU()


def _conv_bn_reference(conv, bn, x, batch_stats, std=False):
    """conv, BN (batch or running statistics), SiLU written out in float64: the three stages."""
    w, x = conv.weight.detach().double(), x.double()
    if std:
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
    c = F.conv2d(x, w, conv.bias.detach().double(), padding=1)
    if batch_stats:
        mean, var = c.mean((0, 2, 3)), c.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    shape = (1, -1, 1, 1)
    b = (c - mean.view(shape)) / (var.view(shape) + bn.eps).sqrt() * bn.weight.detach().double().view(shape) \
        + bn.bias.detach().double().view(shape)
    return c, b, b * torch.sigmoid(b)


@pytest.mark.parametrize("case", ["train", "autograd", "untracked"])
def test_conv_bn_act_plain_paths_apply_bn_and_the_activation(case):
    """Training BN, autograd on, BN without running statistics: the modules run (batch statistics where BN has
    no running ones or is training), and the activation is still applied."""
    conv, bn, act = _conv_bn_parts(track_running_stats=case != "untracked")
    if case == "train":
        bn.train()
    x = torch.randn(2, 4, 5, 6)
    with torch.set_grad_enabled(case == "autograd"):
        out = conv_bn_act(conv, bn, act, x)
    want = _conv_bn_reference(conv, bn, x, batch_stats=case != "autograd")[2]
    torch.testing.assert_close(out.detach().double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_conv_bn_act_hook_on_any_module_sees_its_output(part):
    """A forward hook on the conv, the BN or the activation: the modules run, each hook once, on its own output."""
    conv, bn, act = _conv_bn_parts()
    seen = []
    (conv, bn, act)[part].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        out = conv_bn_act(conv, bn, act, x)
    stages = _conv_bn_reference(conv, bn, x, batch_stats=False)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].double(), stages[part], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), stages[2], atol=1e-5, rtol=1e-5)


def test_conv_bn_act_runs_a_conv_subclass_forward():
    conv, bn, act = _conv_bn_parts(_StdConv)
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        out = conv_bn_act(conv, bn, act, x)
    torch.testing.assert_close(out.double(), _conv_bn_reference(conv, bn, x, False, std=True)[2], atol=1e-5,
                               rtol=1e-5)
