"""Hessian spectra of the loss by Hessian-vector products (double backward).

* top-k eigenvalues: Lanczos with full re-orthogonalisation (Lanczos, 1950) or power iteration
  with deflation as in PyHessian (Yao et al., "PyHessian: Neural Networks Through the Lens of
  the Hessian", 2020);
* eigenvalue density: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, "An
  Investigation into Neural Net Optimization via Hessian Eigenvalue Density", ICML 2019);
* the per-batch "max eigenvalue spectrum" of Park & Kim, "How Do Vision Transformers Work?"
  (ICLR 2022), §7 of ``shared/specs/how_vits_work.md``.

Everything uses only ``model.parameters()`` and ``model(x)``, so it works for any module.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.plotting import pyplot, save_figure

__all__ = ["hessian_vector_product", "hessian_eigenvalues", "hessian_density", "lanczos",
           "max_eigenvalue_spectrum", "plot_eigenvalue_spectra"]


@contextmanager
def _double_backward_ok():
    """Fused SDPA kernels have no double backward on CPU; the math backend has."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    except ImportError:  # pragma: no cover - older torch
        yield


def _check_batches(batches) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(batches, tuple) and len(batches) == 2 and torch.is_tensor(batches[0]):
        batches = [batches]
    out = list(batches)
    if not out:
        raise ValueError("batches is empty; pass an iterable of (inputs, targets)")
    for b in out:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"each batch must be an (inputs, targets) pair, got {type(b).__name__}")
    return out


class _HVP:
    """H·v for the Hessian of mean_b loss_fn(model(x_b), y_b) (+ weight_decay/2·‖θ‖²)."""

    def __init__(self, model, loss_fn, batches, weight_decay=0.0, params=None):
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _check_batches(batches)
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.numel = sum(p.numel() for p in self.params)
        self.weight_decay = float(weight_decay)
        self.calls = 0
        p0 = self.params[0]
        self.device, self.dtype = p0.device, p0.dtype

    def _split(self, v: torch.Tensor):
        out, i = [], 0
        for p in self.params:
            out.append(v[i:i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        return out

    def loss(self) -> float:
        with torch.no_grad(), _double_backward_ok():
            return float(sum(self.loss_fn(self.model(x), y) for x, y in self.batches)) / len(self.batches)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        vs = self._split(v.to(self.device))
        out = torch.zeros(self.numel, dtype=torch.float64, device=self.device)
        with _double_backward_ok():
            for x, y in self.batches:
                loss = self.loss_fn(self.model(x), y) / len(self.batches)
                grads = torch.autograd.grad(loss, self.params, create_graph=True)
                dot = sum((g * u).sum() for g, u in zip(grads, vs))
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1).double()
                                  for h, p in zip(hv, self.params)])
        if self.weight_decay:
            out += self.weight_decay * v.double()
        return out


def hessian_vector_product(model: nn.Module, loss_fn: Callable, batches, vector: torch.Tensor,
                           weight_decay: float = 0.0) -> torch.Tensor:
    """H·v for a flat vector over ``model``'s trainable parameters (in ``parameters()`` order)."""
    return _HVP(model, loss_fn, batches, weight_decay)(vector)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int, v0: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None, store_dtype=torch.float64):
    """``steps`` Lanczos iterations with full re-orthogonalisation on a symmetric operator of
    size n.  Returns (alpha, beta) of the tridiagonal matrix (beta has len(alpha) − 1 entries),
    the basis Q (len(alpha), n) and the norm of the next residual (0 on an invariant subspace,
    where it stops early); ``|b_next · s_last,i|`` bounds the residual of Ritz pair i."""
    steps = min(steps, n)
    q = torch.randn(n, dtype=torch.float64, generator=generator) if v0 is None else v0.double().cpu().clone()
    q /= q.norm()
    basis = torch.zeros(steps, n, dtype=store_dtype)
    alpha, beta = [], []
    prev, b_prev = None, 0.0
    for j in range(steps):
        basis[j] = q.to(store_dtype)
        w = matvec(q).double().cpu()
        a = float(w @ q)
        alpha.append(a)
        w = w - a * q - (b_prev * prev if prev is not None else 0.0)
        qb = basis[: j + 1].double()
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - qb.T @ (qb @ w)
        b = float(w.norm())
        if b < 1e-10 * max(1.0, abs(a)):
            b = 0.0
            break
        if j == steps - 1:
            break
        beta.append(b)
        prev, q, b_prev = q, w / b, b
    return (torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64),
            basis[: len(alpha)], b)


def _tridiag_eig(alpha, beta):
    t = torch.diag(alpha)
    if len(beta):
        t += torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(t)


def _lanczos_top(op: _HVP, k: int, max_iter: int, tol: float, generator) -> List[float]:
    n = op.numel
    m = min(n, max(2 * k + 10, 30))
    max_iter = min(n, max(max_iter, m))
    while True:
        alpha, beta, _, b_next = lanczos(op, n, m, generator=generator)
        theta, s = _tridiag_eig(alpha, beta)
        top = theta.flip(0)[:k]
        if b_next == 0.0 or m >= max_iter:  # exact (invariant subspace) or out of budget
            return top.tolist()
        # Ritz residual ‖H y − θ y‖ = |b_next · s_last,i|
        res = (b_next * s[-1, :].abs()).flip(0)[:k]
        scale = max(float(theta.abs().max()), 1e-12)
        if bool((res <= tol * scale).all()):
            return top.tolist()
        m = min(max_iter, 2 * m)


def _power_top(op: _HVP, k: int, max_iter: int, tol: float, generator) -> List[float]:
    """PyHessian-style power iteration with deflation: largest-|λ| eigenvalues."""
    found_vals, found_vecs = [], []
    n = op.numel
    for _ in range(min(k, n)):
        v = torch.randn(n, dtype=torch.float64, generator=generator)
        v /= v.norm()
        lam = None
        for _ in range(max_iter):
            for u in found_vecs:
                v -= (u @ v) * u
            v /= v.norm()
            hv = op(v).cpu()
            for lu, u in zip(found_vals, found_vecs):  # deflate: (H − Σ λ u uᵀ) v
                hv -= lu * (u @ v) * u
            new = float(hv @ v)
            v = hv / hv.norm().clamp_min(1e-300)
            if lam is not None and abs(new - lam) / (abs(lam) + 1e-12) < tol:
                lam = new
                break
            lam = new
        found_vals.append(lam)
        found_vecs.append(v)
    return sorted(found_vals, reverse=True)


def hessian_eigenvalues(model: nn.Module, loss_fn: Callable, batches, k: int = 5, method: str = "auto",
                        max_iter: int = 200, tol: float = 1e-4, weight_decay: float = 0.0, seed: int = 0,
                        eval_mode: bool = True) -> List[float]:
    """Top-k eigenvalues (descending) of the Hessian of the mean loss over ``batches``
    (an iterable of ``(inputs, targets)``; the loss is the mean over batches of
    ``loss_fn(model(inputs), targets)``, plus ``weight_decay/2·‖θ‖²`` if given, which shifts
    every eigenvalue by ``+weight_decay``) with respect to the trainable parameters.

    ``method``: ``"lanczos"`` (largest algebraic eigenvalues; keeps a basis of up to
    ``max_iter`` parameter-sized vectors), ``"power"`` (PyHessian's power iteration with
    deflation: the k largest in magnitude, O(k) vectors), ``"auto"`` (Lanczos when the basis
    fits in ~1 GiB).  Cost: one Hessian-vector product (≈ 2 backward passes over all batches)
    per iteration, typically 30-100 iterations.  The model is put in eval mode while it runs.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if method not in ("auto", "lanczos", "power"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'power', got {method!r}")
    op = _HVP(model, loss_fn, batches, weight_decay)
    if k > op.numel:
        raise ValueError(f"k={k} exceeds the number of parameters ({op.numel})")
    if method == "auto":
        method = "lanczos" if op.numel * min(max_iter, op.numel) * 8 < 2 ** 30 else "power"
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        if method == "lanczos":
            return _lanczos_top(op, k, max_iter, tol, gen)
        return _power_top(op, k, max_iter, tol * 10, gen)
    finally:
        model.train(was_training)


def hessian_density(model: nn.Module, loss_fn: Callable, batches, steps: int = 30, probes: int = 1,
                    sigma: Optional[float] = None, grid: int = 500, weight_decay: float = 0.0,
                    seed: int = 0) -> Dict[str, list]:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., ICML 2019).

    For each of ``probes`` Rademacher vectors, ``steps`` Lanczos iterations give nodes θ_i
    and weights τ_i (squared first components of the Ritz vectors); the density is the average
    of Σ τ_i N(λ; θ_i, σ²) on a grid.  Returns ``nodes``, ``weights`` (per probe), ``grid``,
    ``density``.  Cost: probes × steps Hessian-vector products and a basis of ``steps``
    parameter-sized vectors.
    """
    op = _HVP(model, loss_fn, batches, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    nodes, weights = [], []
    try:
        for _ in range(probes):
            v0 = torch.randint(0, 2, (op.numel,), generator=gen).double() * 2 - 1
            alpha, beta, _, _ = lanczos(op, op.numel, steps, v0=v0)
            theta, s = _tridiag_eig(alpha, beta)
            nodes.append(theta.tolist())
            weights.append((s[0] ** 2).tolist())
    finally:
        model.train(was_training)
    allv = torch.tensor([t for ns in nodes for t in ns], dtype=torch.float64)
    lo, hi = float(allv.min()), float(allv.max())
    span = max(hi - lo, 1e-8)
    sigma = sigma if sigma is not None else span / 100
    xs = torch.linspace(lo - 0.1 * span, hi + 0.1 * span, grid, dtype=torch.float64)
    dens = torch.zeros_like(xs)
    for ns, ws in zip(nodes, weights):
        t = torch.tensor(ns, dtype=torch.float64)
        w = torch.tensor(ws, dtype=torch.float64)
        dens += (w[None] * torch.exp(-(xs[:, None] - t[None]) ** 2 / (2 * sigma ** 2))).sum(1)
    dens /= probes * math.sqrt(2 * math.pi) * sigma
    return {"nodes": nodes, "weights": weights, "grid": xs.tolist(), "density": dens.tolist(), "sigma": sigma}


def max_eigenvalue_spectrum(model: nn.Module, loss_fn: Callable, batches, k: int = 5, weight_decay: float = 0.0,
                            method: str = "auto", max_iter: int = 100, max_batches: Optional[int] = None,
                            progress: bool = False) -> List[float]:
    """Park & Kim (2022) §7: the top-k Hessian eigenvalues of **each** mini-batch loss
    (NLL + weight_decay/2·‖θ‖²), gathered into one list (its KDE is the "max eigenvalue
    spectrum"; negative values show non-convex directions).
    Cost: per batch, about 30-100 Hessian-vector products.
    """
    vals: List[float] = []
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, total=max_batches, desc="hessian", leave=False)
    for i, (x, y) in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        vals.extend(hessian_eigenvalues(model, loss_fn, [(x, y)], k=k, method=method, max_iter=max_iter,
                                        weight_decay=weight_decay, seed=i))
    return vals


def plot_eigenvalue_spectra(spectra: Dict[str, Sequence[float]], path, title: str = "Hessian max eigenvalue spectra"):
    """KDE of each model's eigenvalue list (overlaid)."""
    plt = pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    allv = np.concatenate([np.asarray(v, dtype=float) for v in spectra.values() if len(v)])
    lo, hi = float(allv.min()), float(allv.max())
    pad = 0.1 * max(hi - lo, 1e-6)
    xs = np.linspace(lo - pad, hi + pad, 400)
    for name, v in spectra.items():
        v = np.asarray(v, dtype=float)
        if len(v) >= 2 and np.ptp(v) > 0:
            from scipy.stats import gaussian_kde
            ax.plot(xs, gaussian_kde(v)(xs), label=name)
        ax.plot(v, np.zeros_like(v), "|", ms=12)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
