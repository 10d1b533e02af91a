"""The inference fast path that overwrites a block's own fresh buffers (vitlab.layers.inplace):
taken only when safe, and bit-identical to the out-of-place path (with the oneDNN linear path off, which
sums in another order; tests/test_linear.py covers it)."""
import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import vitlab
from vitlab.layers import Mlp
from vitlab.layers.inplace import activate, conv_bn_act, overwritable, residual_add

pytestmark = pytest.mark.usefixtures("plain_linear")


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()])
def test_activate_in_place_only_without_autograd(act):
    lin = nn.Linear(8, 16)
    x = torch.randn(4, 8)
    with torch.no_grad():
        h = lin(x)
        ref = act(h.clone())
        out = activate(act, h, lin)
    assert out.data_ptr() == h.data_ptr()  # the fast path wrote into fc1's output
    assert torch.equal(out, ref)
    h2 = lin(x)  # autograd on: never in place
    out2 = activate(act, h2, lin)
    assert out2.data_ptr() != h2.data_ptr()
    assert torch.equal(out2.detach(), ref)


def test_activate_leaves_unknown_activations_alone():
    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x
    h = torch.randn(3)
    with torch.no_grad():
        out = activate(Twice(), h)
    assert out.data_ptr() != h.data_ptr() and torch.equal(out, 2 * h)


def test_forward_hooks_disable_the_fast_path():
    lin = nn.Linear(8, 16)
    seen = []
    handle = lin.register_forward_hook(lambda m, i, o: seen.append(o))
    assert not overwritable(lin)
    with torch.no_grad():
        h = lin(torch.randn(2, 8))
        kept = h.clone()
        activate(nn.GELU(), h, lin)
    assert torch.equal(seen[0], kept)  # the hook's tensor was not overwritten by the GELU
    handle.remove()
    assert overwritable(lin) is False  # autograd is on here
    with torch.no_grad():
        assert overwritable(lin)
        g = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            assert not overwritable(lin)  # a global hook may keep any output
        finally:
            g.remove()


def test_residual_add_never_touches_x_and_refuses_aliases():
    x = torch.randn(2, 5, 4)
    x0 = x.clone()
    with torch.no_grad():
        y = torch.randn(2, 5, 4)
        y0 = y.clone()
        out = residual_add(x, y)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, x0 + y0) and torch.equal(x, x0)
        view = x[:]  # the branch is (a view of) x itself: must not be doubled in place
        out = residual_add(x, view)
        assert torch.equal(x, x0) and torch.equal(out, 2 * x0)
        small = torch.randn(4)  # broadcasting branch: out of place
        out = residual_add(x, small)
        assert out.shape == x.shape and torch.equal(small, small.clone())


@pytest.mark.parametrize("kw", [{}, {"post_norm": True}, {"shortcut": "layerscale", "featscale": True},
                                {"mixer": "focused_linear"}])
def test_vit_inference_fast_path_equals_reference(kw, one_thread):
    torch.manual_seed(0)
    m = vitlab.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=7, **kw).eval()
    if kw.get("shortcut"):
        with torch.no_grad():
            for blk in m.blocks:  # make every branch count
                blk.ls1.gamma.fill_(0.5)
                blk.ls2.gamma.fill_(0.7)
    x = torch.randn(3, 3, 32, 32)
    x0 = x.clone()
    ref = m(x).detach()  # autograd on: the out-of-place reference path
    ref_int = [e.feature.detach() for e in m.forward_halves(x)]
    with torch.inference_mode():
        fast = m(x)
        fast_int = [e.feature for e in m.forward_halves(x)]
    assert torch.equal(fast, ref)  # same ops on the same values: bit-identical
    assert all(torch.equal(a, b) for a, b in zip(fast_int, ref_int))  # earlier intermediates not overwritten
    assert torch.equal(x, x0)


def test_mlp_hook_on_fc1_sees_pre_activation():
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    seen = {}
    mlp.fc1.register_forward_hook(lambda m, i, o: seen.setdefault("fc1", o))
    x = torch.randn(5, 8)
    with torch.no_grad():
        out = mlp(x)
    assert torch.equal(seen["fc1"], mlp.fc1(x).detach())  # not the GELU of it
    assert torch.allclose(out, mlp.fc2(nn.functional.gelu(mlp.fc1(x))).detach())


# -- chunked no-autograd paths: same results, bounded temporaries -----------------------------------
@pytest.mark.parametrize("num_prefix,pos", [(0, False), (1, True)])
def test_focused_linear_chunked_equals_fast_path(num_prefix, pos, monkeypatch):
    from vitlab.layers import FocusedLinearAttention, TokenLayout

    torch.manual_seed(0)
    hw = (7, 9)
    n = hw[0] * hw[1] + num_prefix
    m = FocusedLinearAttention(48, num_heads=3, num_tokens=n if pos else None).eval()
    with torch.no_grad():
        m.scale_param.normal_(std=0.5)
        if pos:
            m.pos_enc.normal_(std=0.5)
    m.core.chunk_tokens = 10  # 7 chunks per image, the last one partial
    x = torch.randn(2, n, 48)
    ref = m(x, TokenLayout(hw, num_prefix)).detach()  # autograd on: the unchunked path
    calls = []
    monkeypatch.setattr(type(m.core), "_fast", lambda *a: calls.append(1) or pytest.fail("unchunked path taken"))
    with torch.inference_mode():
        out = m(x, TokenLayout(hw, num_prefix))
    assert not calls and (out - ref).abs().max() < 1e-5 * ref.abs().max()
    monkeypatch.undo()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: unchunked
        assert m(x, TokenLayout(hw, num_prefix)).dtype == torch.bfloat16


def test_mlp_chunked_equals_reference_and_is_taken_only_when_safe(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(24, 96).eval()
    mlp.chunk_bytes, mlp.chunk_target = 1000, 3000  # hidden 3 x 37 x 96 x 4 B = 42 KiB -> 15 chunks
    x = torch.randn(3, 37, 24)
    ref = mlp(x).detach()
    taken = []
    orig = Mlp._chunked
    monkeypatch.setattr(Mlp, "_chunked", lambda self, x: taken.append(1) or orig(self, x))
    with torch.no_grad():
        out = mlp(x)
    assert taken and out.shape == ref.shape and (out - ref).abs().max() < 1e-6
    taken.clear()
    mlp.train()
    mlp.drop1.p = 0.5  # dropout active: whole-tensor path
    with torch.no_grad():
        mlp(x)
    assert not taken
    mlp.eval()
    h = mlp.fc2.register_forward_hook(lambda *a: None)  # a hook on fc2 must see its whole output
    with torch.no_grad():
        mlp(x)
    assert not taken
    h.remove()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x)
    assert not taken
    mlp.chunk_bytes = 10 ** 9  # small hidden tensors: no chunking
    with torch.no_grad():
        mlp(x)
    assert not taken


def test_residual_wiring_calls_every_part():
    """The Block reads its parts: FeatScale, conv units, shortcuts, norms, mixer, MLP (a class
    attribute shadowing a submodule slot once silently dropped FeatScale and conv units)."""
    from vitlab.layers import Mlp, MultiHeadAttention, TokenLayout
    from vitlab.models.block import Block

    vit_layout, win_layout = TokenLayout((4, 4), 1), TokenLayout((4, 4))
    blocks = [(Block(32, MultiHeadAttention(32, 2, layout=vit_layout), Mlp(32, 64), featscale=True, conv_units=True,
                     branch_scale="weighted"), (vit_layout,), 17),
              (Block(32, MultiHeadAttention(32, 2, grouping="window", window_size=2, shift=True, layout=win_layout),
                     Mlp(32, 64), featscale=True, conv_units=True, wiring="post"), (win_layout,), 16)]
    for blk, ctx, n in blocks:
        calls = []
        parts = [blk.featscale, *blk.conv_units, blk.norm1, blk.norm2, blk.attn, blk.mlp, blk.ls1, blk.ls2]
        for i, m in enumerate(parts):
            m.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
        blk(torch.randn(2, n, 32), *ctx)
        assert sorted(set(calls)) == list(range(len(parts))), (type(blk).__name__, calls)


@pytest.mark.parametrize("name, kw", [("vit_tiny_patch4_32", dict(mixer="focused_linear")),
                                      ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1),
                                                                            num_heads=(1, 1, 1, 1))),
                                      ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)))])
def test_no_graph_break_under_torch_compile_without_autograd(name, kw):
    """The eager fast paths (storage checks, chunk loops) are off while dynamo traces: one graph for
    an inference forward, as for a training one."""
    import torch._dynamo as dynamo

    m = vitlab.create_model(name, **kw).eval()
    x = torch.randn(1, *m.default_cfg["input_size"])
    with torch.no_grad():
        assert overwritable()  # eager: the fast path is on
        e = dynamo.explain(m)(x)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in e.break_reasons]


@pytest.mark.parametrize("act", [None, nn.SiLU(), nn.Hardswish()])
@pytest.mark.parametrize("conv_bias,affine", [(False, True), (True, True), (False, False)])
def test_conv_bn_act_folds_the_running_statistics(act, conv_bias, affine):
    """The folded conv equals conv -> BN (eval, perturbed statistics) -> act computed in float64, and runs no
    BatchNorm op; training-mode BN takes the plain modules (its running statistics update)."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=conv_bias), nn.BatchNorm2d(8, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 6, 5, 7)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    with torch.no_grad():
        ref = (act or nn.Identity())(bn64(conv64(x.double())))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = conv_bn_act(conv, bn, act, x)
    assert not any("batch_norm" in e.key for e in prof.key_averages())
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    bn.train()
    before = bn.running_mean.clone()
    with torch.no_grad():
        conv_bn_act(conv, bn, act, x)
    assert not torch.equal(bn.running_mean, before)  # training-mode BN ran (and updated its statistics)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "mobilevit_xxs"])
def test_meta_device_forward_without_grad(name):
    """Shapes on the meta device under no_grad (the inference paths ask whether autocast is on, which the meta
    device cannot answer): the same output shape as a real forward's."""
    import vitlab

    with torch.device("meta"):
        model = vitlab.create_model(name).eval()
    size = model.default_cfg["input_size"]
    with torch.no_grad():
        out = model(torch.empty(2, *size, device="meta"))
    assert out.shape == (2, model.num_classes) and out.is_meta
