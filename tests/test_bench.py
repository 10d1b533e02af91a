"""Tests of ``vitlab.bench`` (the measuring instrument) and of the fast paths it measures.

No timed assertions: counts, call orders, memory against closed forms, FLOPs against closed forms
and timm, and fast-path outputs against the explicit reference path.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab import bench
from vitlab.bench import BenchResult, StepSpec, compare, count_flops, make_step, peak_step_memory, time_steps
from vitlab.cli import main as cli_main
from vitlab.layers import cores as attention_mod
from vitlab.layers.mixers import create_mixer
from vitlab.layers.recording import record_attention

TINY = dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, img_size=32, patch_size=8)


# -- FLOPs -----------------------------------------------------------------------------------------
def test_count_flops_mlp_forward_and_backward_closed_form():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    fwd = 2 * 12 * 16 + 2 * 16 * 4
    # backward: layer 2 needs grad of input and of weight; layer 1 only grad of weight (input needs no grad)
    bwd = 2 * (2 * 16 * 4) + 2 * 12 * 16
    assert count_flops(model, (3, 2, 2)) == fwd
    assert count_flops(model, (3, 2, 2), train=True) == fwd + bwd
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def test_count_flops_vit_matches_closed_form_and_timm():
    timm = pytest.importorskip("timm")
    c, p, img, depth, ncls = 32, 8, 32, 2, 10
    model = vitlab.create_model("vit_tiny_patch16_224", **TINY)
    n = (img // p) ** 2 + 1
    per_block = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * 4 * c
    closed = 2 * (n - 1) * c * 3 * p * p + depth * per_block + 2 * c * ncls
    assert count_flops(model, (3, img, img)) == closed
    peer = timm.create_model("vit_tiny_patch16_224", img_size=img, patch_size=p, embed_dim=c, depth=depth,
                             num_heads=2, num_classes=ncls)
    assert count_flops(peer, (3, img, img)) == closed
    # the models' mode is restored
    model.train()
    count_flops(model, (3, img, img))
    assert model.training


# -- memory ------------------------------------------------------------------------------------------
def test_cpu_peak_memory_closed_form():
    n = 250_000  # float32: 1e6 bytes

    def two_live():
        a = torch.ones(n)
        b = torch.ones(n)
        return a, b

    def one_at_a_time():
        for _ in range(3):
            a = torch.ones(n)
            del a

    assert 2_000_000 <= peak_step_memory(two_live) < 2_100_000
    assert 1_000_000 <= peak_step_memory(one_at_a_time) < 1_100_000


def test_peak_memory_of_inference_grows_with_batch():
    model = vitlab.create_model("vit_tiny_patch16_224", **TINY)
    m2, m8, m14 = (peak_step_memory(make_step(model, StepSpec(batch_size=b, input_size=(3, 32, 32))))
                   for b in (2, 8, 14))
    # the largest live activations are (B, N, 4C) MLP hiddens: at least one of them is counted, and the peak
    # grows linearly with the batch on top of fixed-size buffers (oneDNN's weight reorder scratch, small
    # tensors; batch 1 is left out, where they are most of the peak)
    hidden = 17 * 128 * 4
    assert m2 >= 2 * hidden and m8 - m2 >= 6 * hidden
    assert 0.8 < (m14 - m8) / (m8 - m2) < 1.25


# -- steps, timing and alternation -----------------------------------------------------------------
class Recorder(nn.Module):
    def __init__(self, tag, log):
        super().__init__()
        self.tag, self.log = tag, log
        self.lin = nn.Linear(3, 5)

    def forward(self, x):
        self.log.append(self.tag)
        return self.lin(x.mean(dim=(2, 3)))


def test_time_steps_counts_calls_and_rejects_bad_values():
    calls = []
    times = time_steps(lambda: calls.append(1), runs=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="runs"):
        time_steps(lambda: None, runs=0)


def test_compare_alternates_models_step_by_step():
    log = []
    models = {"a": Recorder("a", log), "b": Recorder("b", log)}
    res = compare(models, StepSpec(batch_size=2, input_size=(3, 4, 4)), runs=3, warmup=1, flops=False,
                  memory=False)
    # warm-up a, b; then 3 rounds, the order flipped every other round (no model always follows the same one)
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(r.times_s) for r in res.values()] == [3, 3]
    assert res["a"].params == 3 * 5 + 5


def test_compare_with_matmul_reference():
    res = compare({"m": Recorder("m", [])}, StepSpec(batch_size=2, input_size=(3, 4, 4)), runs=2, warmup=0,
                  flops=False, memory=False, mm_size=64)
    mm = res[bench.MM_KEY]
    assert mm.flops_per_image == 2 * 64 ** 3 and len(mm.times_s) == 2
    assert mm.flops_per_s == pytest.approx(2 * 64 ** 3 / mm.median_s)


def test_bench_result_derived_numbers():
    r = BenchResult("x", "infer", "cpu", 8, (3, 4, 4), "none", 10, 1000, None, times_s=[0.5, 0.1, 0.2])
    assert r.median_s == 0.2
    assert r.img_per_s == pytest.approx(40.0)
    assert r.flops_per_s == pytest.approx(1000 * 8 / 0.2)


def test_train_step_updates_weights_and_clears_grads():
    model = vitlab.create_model("vit_tiny_patch16_224", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = make_step(model, StepSpec(batch_size=2, input_size=(3, 32, 32), train=True))
    step()
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "blocks.0.attn.qkv.weight" in changed


def test_infer_step_leaves_weights_and_sets_eval():
    model = vitlab.create_model("vit_tiny_patch16_224", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_step(model, StepSpec(batch_size=2, input_size=(3, 32, 32)))()
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=0), "batch size"),
    (dict(amp="fp8"), "amp"),
    (dict(device="tpu"), "device"),
    (dict(input_size=(3, 0, 4)), "input size"),
])
def test_step_spec_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        StepSpec(**kw)


# -- the command line --------------------------------------------------------------------------------
def test_cli_json_numbers_match_independent_counts(capsys):
    rc = cli_main(["bench", "--model", "vit_tiny_patch4_32", "--batch-size", "2", "--runs", "2", "--warmup", "0",
                   "--no-roofline", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ref = vitlab.create_model("vit_tiny_patch4_32")
    assert out["params"] == sum(p.numel() for p in ref.parameters())
    from vitlab.models.cli import count_macs

    assert out["flops_per_image"] == 2 * count_macs(ref)
    assert out["batch_size"] == 2 and len(out["times_s"]) == 2
    assert out["img_per_s"] == pytest.approx(2 / out["median_s"])
    assert out["peak_mem_bytes"] > 0


@pytest.mark.parametrize("argv, match", [
    (["--model", "vit_tiny_patch4_3"], "vit_tiny_patch4_32"),
    (["--model", "vit_tiny_patch4_32", "--batch-size", "0"], "batch size"),
    (["--model", "vit_tiny_patch4_32", "--runs", "0"], "--runs"),
])
def test_cli_user_errors_are_one_line(argv, match, capsys):
    assert cli_main(["bench"] + argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_cli_cuda_without_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli_main(["bench", "--model", "vit_tiny_patch4_32", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# -- fast paths: taken when not recording, equal to the explicit reference path ------------------------
SOFTMAX_FAMILY = ["softmax", "cosine", "attnscale"]


@pytest.mark.parametrize("mixer", SOFTMAX_FAMILY)
def test_softmax_family_uses_sdpa_unless_recording(mixer, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", counting)
    m = create_mixer(mixer, 16, 2)
    x = torch.randn(2, 5, 16)
    m(x)
    assert len(calls) == 1
    with record_attention(m):
        m(x)
    assert len(calls) == 1  # the explicit path forms the probabilities itself


@pytest.mark.parametrize("mixer", SOFTMAX_FAMILY + ["focused_linear"])
def test_fast_path_equals_reference_path(mixer):
    """Output and gradients of the fused path equal those of the explicit (recording) path."""
    from vitlab.layers import TokenLayout

    layout = TokenLayout((4, 4), 1)
    # softmax family: with a relative position bias (an additive logit bias; zero rows for the prefix token)
    family = {} if mixer == "focused_linear" else dict(position=("relative",))
    m = create_mixer(mixer, 32, 4, layout=layout, family=family)
    with torch.no_grad():  # non-trivial values for the zero-initialised parameters
        for name, p in m.named_parameters():
            if any(k in name for k in ("omega", "scale_param", "pos_enc", "relative_position_bias_table")):
                p.normal_(0, 0.3)
    x = torch.randn(3, 17, 32, dtype=torch.float64, requires_grad=True)
    m = m.double()
    fast = m(x, layout)
    (gx_fast,) = torch.autograd.grad(fast.square().sum(), x)
    with record_attention(m):
        ref = m(x, layout)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-8, atol=1e-8)
    # and in float32, the tolerance the benchmarks rely on
    m32, x32 = m.float(), x.detach().float()
    with torch.no_grad():
        f32 = m32(x32, layout)
        with record_attention(m32):
            r32 = m32(x32, layout)
    torch.testing.assert_close(f32, r32, rtol=1e-4, atol=1e-5)


def test_vit_equals_timm_in_the_benchmarked_configuration():
    """The benchmark compares like with like: same weights give the same logits in vitlab and timm."""
    pytest.importorskip("timm")
    from parity import check_parity

    # every parameter randomised (timm's init leaves the biases at zero)
    check_parity("vit_small_patch16_224", atol=1e-5, img_size=32, depth=2, num_classes=10)


def reference_focused_linear(m, x, hw, num_prefix):
    """FocusedLinearAttention as first written (spec flatten.md section 3), step by step, unfused."""
    b, n, c = x.shape
    h, d = m.num_heads, m.head_dim
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    if m.pos_enc is not None:
        k = k + m.pos_enc
    div = F.softplus(m.scale_param)

    def phi(t):
        t = (F.relu(t) + 1e-6) / div
        tp = t ** m.core.focusing_factor
        return tp * (t.norm(dim=-1, keepdim=True) / tp.norm(dim=-1, keepdim=True))

    split = lambda t: t.reshape(b, n, h, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(phi(q)), split(phi(k)), split(v)
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    out = (q @ ((k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5))) * z
    fm = v[:, :, num_prefix:].reshape(b * h, hw[0], hw[1], d).permute(0, 3, 1, 2)
    dw = m.dwc(fm).permute(0, 2, 3, 1).reshape(b, h, hw[0] * hw[1], d)
    out = out + torch.cat([dw.new_zeros(b, h, num_prefix, d), dw], dim=2)
    return m.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("num_prefix, hw, pos", [(0, (4, 4), True), (1, (3, 5), True), (2, (4, 4), False)])
def test_fused_focused_linear_equals_unfused_reference(num_prefix, hw, pos):
    from vitlab.layers import TokenLayout

    n = hw[0] * hw[1] + num_prefix
    m = create_mixer("focused_linear", 48, 3, num_tokens=n if pos else None).double()
    with torch.no_grad():
        m.scale_param.normal_(0, 0.5)
        m.dwc.bias.normal_(0, 0.5)
        if pos:
            m.pos_enc.normal_(0, 0.5)
    x = torch.randn(2, n, 48, dtype=torch.float64, requires_grad=True)
    out = m(x, TokenLayout(hw, num_prefix))
    ref = reference_focused_linear(m, x, hw, num_prefix)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(m.parameters()), g)
    grads_ref = torch.autograd.grad(ref, [x] + list(m.parameters()), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    # float32 fused path against the float64 reference
    m32 = m.float()
    with torch.no_grad():
        torch.testing.assert_close(m32(x.detach().float(), TokenLayout(hw, num_prefix)), ref.detach().float(),
                                   rtol=1e-4, atol=1e-5)


def test_focused_linear_rejects_a_grid_that_does_not_fit():
    from vitlab.layers import TokenLayout

    m = create_mixer("focused_linear", 16, 2)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 12, 16), TokenLayout((3, 3)))
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 12, 16))
