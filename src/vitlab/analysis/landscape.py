"""Loss landscapes: 2-D slices along filter-normalised random directions.

Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets"
(NeurIPS 2018), with the protocol of Park & Kim, "How Do Vision Transformers Work?"
(ICLR 2022) §6 of ``shared/specs/how_vits_work.md``: directions d₁, d₂ ~ N(0, 1) per tensor,
rescaled filter-wise to the norm of the weights, zero for tensors with fewer than 2 dims and
for position tables; the model is evaluated in eval mode at θ₀ + x·d₁ + y·d₂ on a fixed set
of (augmented) batches; the plotted loss is NLL + weight_decay × L2 with L2 = Σ_tensors ‖θ‖₂
(the released convention) or the standard (weight_decay/2)·Σ‖θ‖².
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.plotting import pyplot, save_figure

__all__ = ["filter_normalized_direction", "loss_landscape", "soft_cross_entropy", "plot_landscape", "landscape_surface",
           "NORMALIZATIONS", "L2_MODES"]

NORMALIZATIONS = ("filter", "dim0", "layer")
L2_MODES = ("norm", "squared")
_SKIP = ("pos_embed", "relative_position")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for hard labels (N,) or soft targets (N, K) (Mixup/CutMix with label
    smoothing), mean over the batch."""
    if target.dim() == logits.dim() and target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target)


def _direction_tensors(model: nn.Module):
    """(name, tensor) of the state dict entries a direction moves (float, ≥ 2 dims, no
    position tables)."""
    for name, t in model.state_dict(keep_vars=True).items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        yield name, t, (t.dim() >= 2 and not any(s in name for s in _SKIP))


def filter_normalized_direction(model: nn.Module, norm: str = "filter", seed: Optional[int] = None,
                                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """A random direction with one entry per floating-point state-dict tensor of ``model``.

    ``norm``: ``"filter"`` (Li et al. 2018: each output filter d[i] rescaled to ‖θ[i]‖),
    ``"dim0"`` (the released code of Park & Kim: norms taken along dim 0, i.e. per d[:, j, ...]),
    ``"layer"`` (whole tensor).  Tensors with fewer than 2 dims (biases, norm scales, BN
    statistics) and ``pos_embed`` / ``relative_position`` tables get a zero direction.
    """
    if norm not in NORMALIZATIONS:
        raise ValueError(f"norm must be one of {', '.join(NORMALIZATIONS)}, got {norm!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    out = {}
    for name, t, moved in _direction_tensors(model):
        w = t.detach()
        if not moved:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        w64 = w.double().cpu()
        if norm == "filter":
            dims = tuple(range(1, w.dim()))
            scale = (torch.linalg.vector_norm(w64, dim=dims, keepdim=True)
                     / (torch.linalg.vector_norm(d, dim=dims, keepdim=True) + 1e-10))
        elif norm == "dim0":
            scale = w64.norm(dim=0, keepdim=True) / (d.norm(dim=0, keepdim=True) + 1e-7)
        else:
            scale = w64.norm() / (d.norm() + 1e-10)
        out[name] = (d * scale).to(device=w.device, dtype=w.dtype)
    return out


def _l2_terms(model: nn.Module):
    params = [p.detach().double() for p in model.parameters()]
    return sum(float(p.norm()) for p in params), sum(float(p.pow(2).sum()) for p in params)


def _evaluate(model, batches, loss_fn, weight_decay: float, l2: str):
    """(mean loss over batches, accuracy, l2 term) at the model's current weights."""
    tot, correct, n = 0.0, 0, 0
    for x, y in batches:
        out = model(x)
        tot += float(loss_fn(out, y))
        hard = y.argmax(-1) if (y.dim() == out.dim() and y.is_floating_point()) else y
        correct += int((out.argmax(-1) == hard).sum())
        n += len(y)
    l2n, l2sq = _l2_terms(model)
    term = weight_decay * l2n if l2 == "norm" else 0.5 * weight_decay * l2sq
    return tot / len(batches), correct / n, term


def _check_landscape_args(steps, span, l2, batches, directions, state):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(span, (int, float)) and span > 0):
        raise ValueError(f"span must be a positive number, got {span!r}")
    if l2 not in L2_MODES:
        raise ValueError(f"l2 must be one of {', '.join(L2_MODES)}, got {l2!r}")
    if not batches:
        raise ValueError("batches is empty; pass a list of (inputs, targets)")
    if directions is not None and len(directions) != 2:
        raise ValueError(f"need exactly two directions, got {len(directions)}")
    for d in directions or []:
        missing = set(state) - set(d)
        if missing:
            raise ValueError(f"direction lacks state entries: {sorted(missing)[:5]}")


def _walk_grid(model, state, theta0, directions, coords, evaluate, progress: bool):
    """The ``[iy][ix]`` grids of nll, acc, l2 term and loss; restores θ₀ whatever happens."""
    steps = len(coords)
    grid = {k: [[0.0] * steps for _ in range(steps)] for k in ("nll", "acc", "l2_term", "loss")}
    pairs = [(iy, ix) for iy in range(steps) for ix in range(steps)]
    it = pairs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(pairs, desc="landscape", leave=False)
    try:
        for iy, ix in it:
            a, b = coords[ix], coords[iy]
            for k, t in state.items():
                t.copy_(theta0[k] + a * directions[0][k] + b * directions[1][k])
            nll, acc, term = evaluate()
            grid["nll"][iy][ix], grid["acc"][iy][ix] = nll, acc
            grid["l2_term"][iy][ix], grid["loss"][iy][ix] = term, nll + term
    finally:
        for k, t in state.items():
            t.copy_(theta0[k])
    return grid


@torch.no_grad()
def loss_landscape(model: nn.Module, batches: Sequence, loss_fn: Optional[Callable] = None, steps: int = 11,
                   span: float = 1.0, weight_decay: float = 0.0, l2: str = "norm", norm: str = "filter",
                   directions: Optional[Sequence[Dict[str, torch.Tensor]]] = None, seed: int = 0,
                   progress: bool = False) -> Dict:
    """Evaluate the loss on a ``steps`` x ``steps`` grid x, y ∈ [−span, span] around θ₀.

    ``batches``: a fixed list of ``(inputs, targets)`` (targets hard (N,) or soft (N, K); build the
    augmented batches once so every grid point sees the same data).  ``loss_fn(logits, targets)``
    defaults to :func:`soft_cross_entropy` (the NLL).  Returns ``xs``, ``ys``, ``nll``, ``acc`` and
    ``loss`` (= NLL + l2 term) as ``[iy][ix]`` grids, the l2 term per point (``l2``: ``"norm"``
    → weight_decay·Σ‖θ‖₂, ``"squared"`` → weight_decay/2·Σ‖θ‖²), ``center`` (the values at θ₀,
    computed once more at the end as a check that the weights were restored) and the cost.
    Cost: steps² × (one forward pass per batch).  θ₀ is restored afterwards.
    """
    batches = list(batches)
    state = {name: t for name, t, _ in _direction_tensors(model)}
    _check_landscape_args(steps, span, l2, batches, directions, state)
    loss_fn = loss_fn or soft_cross_entropy
    if directions is None:
        gen = torch.Generator().manual_seed(seed)
        directions = [filter_normalized_direction(model, norm, generator=gen) for _ in range(2)]
    theta0 = {k: v.detach().clone() for k, v in state.items()}
    coords = torch.linspace(-span, span, steps, dtype=torch.float64).tolist() if steps > 1 else [0.0]
    evaluate = lambda: _evaluate(model, batches, loss_fn, weight_decay, l2)  # noqa: E731
    was = model.training
    model.eval()
    try:
        grid = _walk_grid(model, state, theta0, directions, coords, evaluate, progress)
        c_nll, c_acc, c_term = evaluate()
    finally:
        model.train(was)
    l2n, l2sq = _l2_terms(model)
    return {"xs": coords, "ys": coords, **grid, "center": {"nll": c_nll, "acc": c_acc, "loss": c_nll + c_term,
                                                         "l2_norm_sum": l2n, "l2_squared_sum": l2sq},
            "weight_decay": weight_decay, "l2_mode": l2, "normalization": norm, "steps": steps, "span": span,
            "evaluations": steps * steps, "num_batches": len(batches),
            "num_samples": sum(len(y) for _, y in batches)}


def landscape_surface(r: Dict, key: str = "loss", clip: float = 42.0):
    """The plotted landscape of Park & Kim 2022 §6: ``r[key]`` shifted so its minimum is 0, values
    above ``clip`` and non-finite values (diverged points) masked (a numpy masked array, rows =
    ``r["ys"]``, columns = ``r["xs"]``)."""
    import numpy as np

    z = np.ma.masked_invalid(np.asarray(r[key], dtype=float))
    return np.ma.masked_greater(z - z.min(), clip)


def plot_landscape(results: Dict[str, Dict], path, key: str = "loss", clip: float = 42.0, surface: bool = False):
    """One panel per model of :func:`landscape_surface`: filled contours with the centre marked,
    or with ``surface=True`` a 3-D surface (masked points left out), as in the paper's figures."""
    plt = pyplot()
    import numpy as np

    n = len(results)
    kw = {"subplot_kw": {"projection": "3d"}} if surface else {}
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6 + 0.6 * surface), squeeze=False, **kw)
    for ax, (label, r) in zip(axes[0], results.items()):
        z = landscape_surface(r, key, clip)
        xs, ys = np.asarray(r["xs"]), np.asarray(r["ys"])
        varied = z.shape[0] >= 2 and z.shape[1] >= 2 and np.ptp(z.compressed() if z.count() else [0]) > 0
        if surface:
            gx, gy = np.meshgrid(xs, ys)
            ax.plot_surface(gx, gy, z.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True)
            ax.set_zlabel(f"{key} − min", fontsize=7)
        else:
            if varied:
                cs = ax.contourf(xs, ys, z, levels=20, cmap="viridis")
                ax.contour(xs, ys, z, levels=10, colors="k", linewidths=0.4)
                fig.colorbar(cs, ax=ax, fraction=0.046)
            else:
                ax.imshow(z, extent=(xs.min(), xs.max(), ys.min(), ys.max()), origin="lower")
            ax.plot([0], [0], "r+", ms=10)  # the centre
        ax.set_title(f"{label}: {key} − min (centre {r['center'][key] if key in r['center'] else float('nan'):.3f})",
                     fontsize=8)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    return save_figure(fig, path)
