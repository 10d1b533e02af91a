"""Hessian eigenvalues / density against the exact Hessian of tiny models."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from vitlab.analysis import hessian_eigenvalues
from vitlab.analysis.hessian import _HVP, hessian_density, hessian_vector_product, lanczos, max_eigenvalue_spectrum


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
               for _ in range(3)]
    return model, batches


def _exact_hessian(model, loss_fn, batches):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return sum(loss_fn(functional_call(model, params, (x,)), y) for x, y in batches) / len(batches)

    return torch.autograd.functional.hessian(f, flat0)


def test_top_eigenvalues_match_exact_hessian():
    model, batches = _tiny()
    loss_fn = nn.CrossEntropyLoss()
    h = _exact_hessian(model, loss_fn, batches)
    assert h.shape == (75, 75)
    exact = torch.linalg.eigvalsh(h).flip(0)
    top = hessian_eigenvalues(model, loss_fn, batches, k=5, method="lanczos")
    assert top == sorted(top, reverse=True)
    for a, b in zip(top, exact[:5].tolist()):
        assert a == pytest.approx(b, rel=0.01)
    # power iteration returns the largest-magnitude eigenvalues
    by_mag = sorted(exact.tolist(), key=abs, reverse=True)[:2]
    pw = hessian_eigenvalues(model, loss_fn, batches, k=2, method="power", max_iter=500, tol=1e-7)
    for a, b in zip(pw, sorted(by_mag, reverse=True)):
        assert a == pytest.approx(b, rel=0.01)
    # weight decay wd/2‖θ‖² shifts every eigenvalue by wd
    shifted = hessian_eigenvalues(model, loss_fn, batches, k=3, method="lanczos", weight_decay=0.5)
    for a, b in zip(shifted, exact[:3].tolist()):
        assert a == pytest.approx(b + 0.5, rel=0.01)


def test_hvp_on_vit_matches_finite_difference_of_gradients():
    from vitlab import create_model
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", depth=1, embed_dim=16, num_heads=2, num_classes=3,
                         img_size=16).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, dtype=torch.float64)
    hv = hessian_vector_product(model, loss_fn, [(x, y)], v)

    def grad_at(delta):
        with torch.no_grad():
            i = 0
            for p in params:
                p.add_(delta[i:i + p.numel()].view_as(p))
                i += p.numel()
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        with torch.no_grad():
            i = 0
            for p in params:
                p.sub_(delta[i:i + p.numel()].view_as(p))
                i += p.numel()
        return torch.cat([t.reshape(-1) for t in g])

    eps = 1e-5
    fd = (grad_at(eps * v) - grad_at(-eps * v)) / (2 * eps)
    assert torch.allclose(hv, fd, rtol=1e-4, atol=1e-5 * float(fd.abs().max()))


def test_slq_quadrature_moments_are_exact():
    """Lanczos quadrature with m nodes integrates λ^p exactly for p ≤ 2m−1: Σ τ θ^p = qᵀH^p q."""
    model, batches = _tiny()
    loss_fn = nn.CrossEntropyLoss()
    h = _exact_hessian(model, loss_fn, batches)
    op = _HVP(model, loss_fn, batches)
    q = torch.randn(75, dtype=torch.float64)
    alpha, beta, _, _ = lanczos(op, 75, 4, v0=q)
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    theta, s = torch.linalg.eigh(t)
    tau = s[0] ** 2
    qn = q / q.norm()
    for p in (1, 2, 3, 5):
        assert float((tau * theta ** p).sum()) == pytest.approx(float(qn @ torch.linalg.matrix_power(h, p) @ qn),
                                                                rel=1e-6)
    dens = hessian_density(model, loss_fn, batches, steps=75, probes=1)
    assert sorted(dens["nodes"][0])[-1] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-6)
    grid = torch.tensor(dens["grid"])
    assert float(torch.trapezoid(torch.tensor(dens["density"]), grid)) == pytest.approx(1.0, abs=0.02)


def test_per_batch_spectrum_and_errors():
    model, batches = _tiny()
    loss_fn = nn.CrossEntropyLoss()
    vals = max_eigenvalue_spectrum(model, loss_fn, batches, k=2, method="lanczos")
    assert len(vals) == 6
    exact0 = torch.linalg.eigvalsh(_exact_hessian(model, loss_fn, batches[:1])).flip(0)[:2]
    assert vals[:2] == pytest.approx(exact0.tolist(), rel=0.01)
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(model, loss_fn, batches, k=0)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigenvalues(model, loss_fn, [], k=1)


class _Quadratic(nn.Module):
    """model(x) = θ (ignores x); with loss 0.5·θᵀAθ its Hessian is exactly A."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        return self.theta


def _ill_conditioned(n=300, seed=0):
    """A = Q diag(λ) Qᵀ: a top cluster 1000, 999.9, ..., 999.6 (relative gaps 1e-4) above a
    spread 1e-3 ... 990 (condition number 1e6): one 30-step Lanczos pass does not resolve the
    cluster, and plain Lanczos (no re-orthogonalisation) grows ghost copies of 1000."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([1000.0, 999.9, 999.8, 999.7, 999.6], dtype=torch.float64)
    rest = torch.logspace(-3, math.log10(990.0), n - len(top), dtype=torch.float64)
    lam = torch.cat([top, rest])
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return (q * lam) @ q.T


def test_lanczos_resolves_an_ill_conditioned_cluster_to_eigvalsh_precision():
    a = _ill_conditioned()
    exact = torch.linalg.eigvalsh(a).flip(0)[:5].tolist()
    model = _Quadratic(a.shape[0])
    loss_fn = lambda out, y: 0.5 * out @ a @ out  # noqa: E731
    batches = [(torch.zeros(1), torch.zeros(1))]
    # one default-size pass (30 steps) is not exact here: the convergence loop must run
    alpha, beta, _, _ = lanczos(_HVP(model, loss_fn, batches), a.shape[0], 30,
                                generator=torch.Generator().manual_seed(0))
    first = torch.linalg.eigvalsh(torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)).flip(0)[:5]
    assert max(abs(u - v) for u, v in zip(first.tolist(), exact)) > 1e-3
    top = hessian_eigenvalues(model, loss_fn, batches, k=5, method="lanczos", max_iter=300, tol=1e-10)
    for got, want in zip(top, exact):
        assert got == pytest.approx(want, rel=1e-9, abs=0)
