"""The oneDNN inference path of vitlab's linear layers (vitlab.layers.linear): taken exactly where it may be,
float32-accurate against a float64 reference, activations fused correctly, and never where autograd, autocast,
hooks or tracing need the plain op."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import vitlab
from vitlab.layers import Mlp
from vitlab.layers.linear import (FUSED_ACTIVATIONS, Linear, clear_bf16_weights, linear, linear_act,
                                  onednn_linear_enabled, set_onednn_linear)

pytestmark = pytest.mark.skipif(not onednn_linear_enabled(), reason="this PyTorch build has no oneDNN linear")

ONEDNN = "mkldnn::_linear_pointwise"


def _ops(fn):
    """The aten/mkldnn op names ``fn()`` dispatched (the profiler's record, independent of our code)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def _fp32_close(got, ref64, k):
    """float32 summation error bound for a length-``k`` dot product, with room for any summation order."""
    tol = 8 * k * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    return (got.double() - ref64).abs().max().item() <= tol


@pytest.mark.parametrize("shape", [(7, 33), (2, 50, 96), (3, 4, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64_and_takes_onednn(shape, bias):
    torch.manual_seed(0)
    lin = Linear(shape[-1], 40, bias=bias)
    x = torch.randn(*shape)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double() if bias else None)
    with torch.no_grad():
        out, ops = _ops(lambda: lin(x))
    assert ONEDNN in ops and "aten::addmm" not in ops and "aten::mm" not in ops
    assert out.shape == ref.shape and out.dtype == torch.float32 and _fp32_close(out, ref, shape[-1])
    # a weight that is a view (a split of a fused qkv weight, a transposed copy) gives the same numbers
    w = torch.randn(80, shape[-1])[::2]
    with torch.no_grad():
        assert _fp32_close(linear(x, w), F.linear(x.double(), w.double()), shape[-1])


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Hardswish(),
                                 nn.Sigmoid(), nn.Tanh()])
def test_fused_activation_equals_activation_of_linear(act):
    torch.manual_seed(0)
    fc = nn.Linear(48, 64)
    x = torch.randn(5, 9, 48) * 2  # both sides of every activation's kink / saturation
    ref = act(F.linear(x.double(), fc.weight.double(), fc.bias.double()))
    with torch.no_grad():
        out, ops = _ops(lambda: linear_act(fc, act, x))
    assert ONEDNN in ops and not any(op.startswith("aten::" + n) for n in ("gelu", "relu", "silu", "hardswish",
                                                                              "sigmoid", "tanh") for op in ops)
    assert _fp32_close(out, ref, 48)


def test_no_fusion_for_other_activations_or_with_autograd():
    fc, x = nn.Linear(8, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert linear_act(fc, nn.LeakyReLU(), x) is None and linear_act(fc, nn.Identity(), x) is None
    assert linear_act(fc, nn.GELU(), x) is None  # autograd on: the op has no backward
    assert set(FUSED_ACTIVATIONS) == {nn.ReLU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh}


def test_plain_op_wherever_onednn_cannot_follow():
    torch.manual_seed(0)
    lin = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    out, ops = _ops(lambda: lin(x))  # autograd: addmm, gradients as nn.Linear's
    assert ONEDNN not in ops
    out.sum().backward()
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(4, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out, ops = _ops(lambda: lin(x))
    assert out.dtype == torch.float16 and ONEDNN not in ops  # float16 autocast: autocast's cast applies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _ops(lambda: lin(x))
    assert out.dtype == torch.bfloat16 and ONEDNN not in ops  # bf16 autocast with autograd: the plain op
    with torch.no_grad():
        out, ops = _ops(lambda: lin.double()(x.double()))
    assert out.dtype == torch.float64 and ONEDNN not in ops
    lin.float()
    with torch.no_grad():  # an exported program records the portable op
        graph = str(torch.export.export(lin, (torch.randn(2, 16),)).graph)
    assert "mkldnn" not in graph and "linear" in graph
    previous = set_onednn_linear(False)
    try:
        with torch.no_grad():
            out, ops = _ops(lambda: lin(x))
        assert ONEDNN not in ops and torch.equal(out, F.linear(x, lin.weight, lin.bias))
    finally:
        set_onednn_linear(previous)


def test_mlp_fuses_only_without_hooks_and_in_eval():
    torch.manual_seed(0)
    mlp = Mlp(16, 64, drop=0.5)
    x = torch.randn(2, 10, 16)
    ref = mlp.fc2(mlp.act(mlp.fc1(x))).detach()  # autograd on: the plain path
    with torch.no_grad():
        mlp.train()  # dropout active: the plain path (dropout between fc1 and fc2)
        _, ops = _ops(lambda: mlp(x))
        assert "aten::gelu_" in ops or "aten::gelu" in ops
        mlp.eval()
        out, ops = _ops(lambda: mlp(x))
        assert not any(op.startswith("aten::gelu") for op in ops) and torch.allclose(out, ref, atol=1e-5)
        seen = []
        handle = mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        out_hooked = mlp(x)
        handle.remove()
    assert len(seen) == 1 and torch.allclose(seen[0], mlp.fc1(x).detach(), atol=1e-5)  # pre-activation output
    assert torch.allclose(out_hooked, ref, atol=1e-5)


def test_vit_logits_agree_with_the_autograd_path():
    torch.manual_seed(0)
    m = vitlab.create_model("vit_small_patch16_224", img_size=64, depth=3, num_classes=10).eval()
    for p in m.parameters():  # every bias and norm matters (the init zeroes biases)
        p.data.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 64, 64)
    ref = m(x).detach()  # autograd on: addmm
    with torch.inference_mode():
        out, ops = _ops(lambda: m(x))
    assert ONEDNN in ops
    assert (out - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


def _bf16_close(got, ref64):
    """Within one bf16 rounding of the output (2^-8 relative) plus float32 accumulation error."""
    return (got.double() - ref64).abs().max().item() <= 2 ** -8 * ref64.abs().max().item() + 1e-4


def _bf16(t):
    return t.detach().to(torch.bfloat16).double()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_bf16_autocast_path_keeps_one_weight_copy_and_follows_updates():
    torch.manual_seed(0)
    clear_bf16_weights()
    lin, act = Linear(96, 64), nn.GELU()
    x = torch.randn(3, 20, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _ops(lambda: lin(x))
        fused, ops_act = _ops(lambda: linear_act(lin, act, x))
    # autocast's arithmetic (bf16 inputs, float32 sums, bf16 output) on oneDNN's op, GELU fused before rounding
    assert out.dtype == fused.dtype == torch.bfloat16
    assert ONEDNN in ops and "aten::addmm" not in ops and not any(op.startswith("aten::gelu") for op in ops_act)
    ref = F.linear(_bf16(x), _bf16(lin.weight), _bf16(lin.bias))
    assert _bf16_close(out, ref) and _bf16_close(fused, F.gelu(ref))
    def casts():  # bf16 casts in a fresh call: x and the bias, and the weight only on its first use
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            lin(x)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert casts() == 2  # x and the bias; the weight's copy was kept
        lin.weight.mul_(-2)  # an in-place update (optimizer step, load_state_dict): a fresh copy
        assert casts() == 3 and casts() == 2
        updated = lin(x)
    assert _bf16_close(updated, F.linear(_bf16(x), _bf16(lin.weight), _bf16(lin.bias)))
    assert clear_bf16_weights() == 1 and clear_bf16_weights() == 0


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_bf16_weight_copies_go_with_their_weights():
    import gc

    from vitlab.layers import linear as linear_mod

    clear_bf16_weights()
    lin = Linear(16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lin(torch.randn(2, 16))
        linear(torch.randn(2, 16), lin.weight[:8])  # a view made per call: kept only while it lives
    assert len(linear_mod._bf16_weights) == 1
    del lin
    gc.collect()
    assert len(linear_mod._bf16_weights) == 0


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_vit_bf16_logits_agree_with_autocast_plain_path():
    torch.manual_seed(0)
    m = vitlab.create_model("vit_small_patch16_224", img_size=64, depth=3, num_classes=10).eval()
    for p in m.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 64, 64)
    previous = set_onednn_linear(False)
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref, ref_ops = _ops(lambda: m(x))
    finally:
        set_onednn_linear(previous)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _ops(lambda: m(x))
    assert ONEDNN in ops and ONEDNN not in ref_ops
    assert not any(op.startswith("aten::gelu") for op in ops)  # the MLP's GELU fused under autocast too
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max().item() < 0.02 * ref.float().abs().max().item()
    clear_bf16_weights()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU")
def test_evaluate_bf16_uses_and_then_drops_the_weight_copies():
    from vitlab.engine.trainer import evaluate
    from vitlab.layers import linear as linear_mod

    torch.manual_seed(0)
    m = vitlab.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    seen = []
    handle = m.register_forward_hook(lambda *a: seen.append(len(linear_mod._bf16_weights)))
    metrics = evaluate(m, batches, torch.device("cpu"), amp="bf16")
    handle.remove()
    # during the pass one copy per block linear (qkv, proj, fc1, fc2), reused by the second batch; none after it
    assert seen == [8, 8] and len(linear_mod._bf16_weights) == 0
    assert 0 <= metrics["top1"] <= 100
