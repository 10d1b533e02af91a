"""Lipschitz upper bound vs closed forms and vs the empirical (Jacobian) lower estimate."""
import math

import pytest
import torch
from torch import nn

from vitlab.analysis import lipschitz_bound_report, lipschitz_estimate, lipschitz_upper_bound
from vitlab.analysis.lipschitz import GELU_LIPSCHITZ, conv2d_norm_bound


pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_and_sequential_closed_forms():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    s1 = float(torch.linalg.matrix_norm(lin.weight.double(), ord=2))
    assert lipschitz_upper_bound(lin) == pytest.approx(s1, rel=1e-9)
    # a linear map: the Jacobian norm at any input is the exact constant
    assert lipschitz_estimate(lin, torch.randn(3, 6), iters=100) == pytest.approx(s1, rel=1e-4)
    seq = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2))
    ref = GELU_LIPSCHITZ * math.prod(float(torch.linalg.matrix_norm(m.weight.double(), ord=2))
                                     for m in (seq[0], seq[2]))
    assert lipschitz_upper_bound(seq) == pytest.approx(ref, rel=1e-9)
    assert lipschitz_estimate(seq, torch.randn(8, 6)) <= lipschitz_upper_bound(seq)
    assert GELU_LIPSCHITZ >= float(torch.func.vmap(torch.func.grad(torch.nn.functional.gelu))(
        torch.linspace(-5, 5, 20001, dtype=torch.float64)).abs().max())


def test_conv_bounds_against_power_iteration():
    torch.manual_seed(0)
    # patchify conv: exact
    patch = nn.Conv2d(3, 8, 4, stride=4, bias=False)
    est = lipschitz_estimate(patch, torch.randn(1, 3, 16, 16), iters=200)
    assert conv2d_norm_bound(patch, (16, 16)) == pytest.approx(est, rel=1e-3)
    # 3x3 zero-padded conv and a depthwise conv: certified upper bound, and close
    for conv in (nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False)):
        est = lipschitz_estimate(conv, torch.randn(1, conv.in_channels, 12, 12), iters=300)
        bound = conv2d_norm_bound(conv, (12, 12))
        assert est <= bound * (1 + 1e-6)
        assert bound <= est * 1.25


def _lips_vit(seed, **kw):
    from vitlab import create_model
    torch.manual_seed(seed)
    m = create_model("lipsformer_vit_tiny_patch4_32", depth=2, embed_dim=16, num_heads=2, img_size=16,
                     mixer_kwargs=dict(tau=10.0, normalize_v=True, eps=0.05), **kw).eval()
    with torch.no_grad():  # move away from the init so every factor matters
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


def test_bound_never_below_estimate_on_random_lipschitz_models():
    for seed, kw in [(0, {}), (1, dict(featscale=True)), (2, dict(global_pool="avg", class_token=False))]:
        m = _lips_vit(seed, **kw)
        rep = lipschitz_bound_report(m)
        assert rep["unbounded"] == [] and math.isfinite(rep["bound"])
        x = torch.randn(3, 3, 16, 16) * 2
        est = lipschitz_estimate(m, x, iters=15)
        assert 0 < est <= rep["bound"], (seed, est, rep["bound"])
        # the bound is the product of the reported factors
        prod = math.prod(f["bound"] for f in rep["factors"])
        assert rep["bound"] == pytest.approx(prod, rel=1e-9)


def test_centernorm_factor_and_unbounded_parts():
    from vitlab import create_model
    m = _lips_vit(0)
    rep = lipschitz_bound_report(m)
    norm = [f for f in rep["factors"] if f["name"] == "norm"][0]
    assert norm["bound"] == pytest.approx(16 / 15 * float(m.norm.weight.abs().max()), rel=1e-9)
    vit = create_model("vit_tiny_patch4_32", depth=1, embed_dim=16, num_heads=2)
    rep = lipschitz_bound_report(vit)
    assert rep["bound"] == math.inf
    assert "blocks.0.attn" in rep["unbounded"] and "blocks.0.norm1" in rep["unbounded"]
    # released cosine attention (V not normalised, no eps) is flagged too
    rel = create_model("lipsformer_vit_tiny_patch4_32", depth=1, embed_dim=16, num_heads=2)
    assert "blocks.0.attn" in lipschitz_bound_report(rel)["unbounded"]
