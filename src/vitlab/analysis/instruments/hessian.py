"""Instrument ``hessian``: the per-batch max-eigenvalue spectrum (Park & Kim 2022 §7) by Lanczos
and the eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., ICML 2019)."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from vitlab.analysis import report as html
from vitlab.analysis.data import augmented_batches
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import figure_path, num_classes, successful
from vitlab.analysis.options import nonneg_int, positive_int
from vitlab.plotting import pyplot, save_figure

KEY, NAMES = "hessian", ("hessian",)
# runs in float32 under any --amp (vitlab.analysis.runner)
FLOAT32 = ("Hessian-vector products differentiate the gradient a second time; bf16 rounding (3 significant digits) "
           "swamps the Lanczos recurrence")


# the full defaults first, then what the budget may choose (in turn: batch, density, Lanczos steps)
SIZES = (Size("hessian_batch_size", (16, 8, 4, 2, 1)), Size("hessian_density_steps", (20, 10, 5, 3)),
         Size("hessian_iters", (30, 20, 12, 8, 6)))
WEIGHT = 3.0  # share of --budget: the costliest instrument per image
LANDSCAPE_IMAGES = 32  # --landscape-images' full default: the Hessian's images come after the landscape's


def add_arguments(p) -> None:
    p.add_argument("--hessian-k", type=positive_int, default=5, help="top eigenvalues per mini-batch")
    p.add_argument("--hessian-batches", type=positive_int, default=1,
                   help="augmented mini-batches for the max-eigenvalue spectrum")
    p.add_argument("--hessian-batch-size", type=positive_int, default=None,
                   help="images per mini-batch; default: 16, fewer if --budget needs")
    p.add_argument("--hessian-iters", type=positive_int, default=None,
                   help="Lanczos steps per batch, exactly (one Hessian-vector product = one forward and two backward "
                        "passes each); at least --hessian-k; default: 30, fewer if --budget needs")
    p.add_argument("--hessian-density-steps", type=nonneg_int, default=None,
                   help="stochastic Lanczos quadrature steps for the eigenvalue density (0 = off); default: 20, "
                        "fewer if --budget needs")


def _images(args, data):
    """(images of the spectrum, images of the first batch, which the density uses)."""
    n = min(args.hessian_batches * args.hessian_batch_size, len(data.train_x))
    return n, min(n, args.hessian_batch_size)


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind (Hessian-vector products on one image each)."""
    if args.hessian_iters < args.hessian_k:
        return {"seconds": math.inf}
    n, first = _images(args, data)
    return {"hvp": args.hessian_iters * n + args.hessian_density_steps * first}


def cost_line(args, data, model) -> str:
    n, first = _images(args, data)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hvps = args.hessian_iters * -(-n // args.hessian_batch_size) + args.hessian_density_steps
    basis = max(args.hessian_iters, args.hessian_density_steps) * params * 8 / 2 ** 30
    return (f"top-{args.hessian_k} eigenvalues of {args.hessian_batches} augmented mini-batch(es) of "
            f"{args.hessian_batch_size} images (--hessian-batches, --hessian-batch-size) by {args.hessian_iters} "
            f"Lanczos steps (--hessian-iters) + {args.hessian_density_steps} quadrature steps for the density "
            f"(--hessian-density-steps) = {hvps} Hessian-vector products (one forward and two backward passes over a "
            f"batch each) = {args.hessian_iters * n + args.hessian_density_steps * first} image forward passes, "
            f"on {params:,} parameters; Lanczos basis {basis:.2f} GiB")


def _batches(model, data, args):
    n = args.hessian_batches * args.hessian_batch_size
    off = args.landscape_images if args.landscape_images is not None else LANDSCAPE_IMAGES
    x, y = data.train_x[off:off + n], data.train_y[off:off + n]
    if len(x) < n:
        x, y = data.train_x[:n], data.train_y[:n]
    return augmented_batches(x, y, num_classes(model, data), args.hessian_batch_size, args.seed + 1, data.norm)


def _spectrum(model, batches, k: int, steps: int, weight_decay: float) -> List[float]:
    """Top-k Ritz values of exactly ``steps`` Lanczos steps on each batch's Hessian (batch i
    starts from ``torch.Generator().manual_seed(i)``: at 30 steps and k <= 10 the numbers of
    :func:`vitlab.analysis.hessian.max_eigenvalue_spectrum`, which takes at least 30 steps)."""
    from vitlab.analysis.hessian import hessian_vector_product, lanczos
    from vitlab.analysis.landscape import soft_cross_entropy
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vals: List[float] = []
    was = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            def hvp(v, batch=batch):
                return hessian_vector_product(model, soft_cross_entropy, [batch], v, weight_decay=weight_decay)
            alpha, beta, _, _ = lanczos(hvp, n, steps, generator=torch.Generator().manual_seed(i))
            t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1) if len(beta) else torch.diag(alpha)
            vals.extend(torch.linalg.eigh(t)[0].flip(0)[:k].tolist())
    finally:
        model.train(was)
    return vals


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.hessian import hessian_density
    from vitlab.analysis.landscape import soft_cross_entropy
    args = full(args, SIZES)
    if args.hessian_iters < args.hessian_k:
        raise ValueError(f"--hessian-iters {args.hessian_iters} is below --hessian-k {args.hessian_k}: Lanczos needs "
                         f"at least k steps for k eigenvalues")
    batches = _batches(model, data, args)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wd = args.weight_decay if args.l2 == "squared" else 0.0
    spec = _spectrum(model, batches, args.hessian_k, args.hessian_iters, wd)
    res = {"max_eigenvalue_spectrum": spec, "k": args.hessian_k, "batches": len(batches),
           "batch_size": args.hessian_batch_size, "weight_decay": wd, "iters": args.hessian_iters,
           "parameters": params}
    if args.l2 != "squared" and args.weight_decay:
        res["note"] = "the 'norm' l2 term has no constant Hessian shift; eigenvalues are of the NLL alone"
    if args.hessian_density_steps:
        dens = hessian_density(model, soft_cross_entropy, batches[:1], steps=args.hessian_density_steps, probes=1,
                               weight_decay=wd, seed=args.seed)
        res["density"] = {k: dens[k] for k in ("grid", "density", "sigma", "nodes", "weights")}
    return res


def plot_density(dens: Dict[str, Dict], path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for lab, d in dens.items():
        ax.semilogy(d["grid"], [max(v, 1e-12) for v in d["density"]], label=lab)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    from vitlab.analysis.hessian import plot_eigenvalue_spectra
    hes = successful(runs, KEY)
    if not hes:
        return []
    P = lambda name: figure_path(out_dir, name)  # noqa: E731
    plot_eigenvalue_spectra({lab: r["max_eigenvalue_spectrum"] for lab, r in hes.items()}, P("hessian_spectrum.png"))
    frags = [html.figure(P("hessian_spectrum.png"), "Max-eigenvalue spectrum: top-k Hessian eigenvalues of each "
                                                    "augmented mini-batch (KDE)")]
    if any("density" in r for r in hes.values()):
        plot_density({lab: r["density"] for lab, r in hes.items() if "density" in r}, P("hessian_density.png"))
        frags.append(html.figure(P("hessian_density.png"), "Eigenvalue density by stochastic Lanczos quadrature"))
    rows = [[lab, max(r["max_eigenvalue_spectrum"]), min(r["max_eigenvalue_spectrum"]),
             ", ".join(f"{v:.4g}" for v in r["max_eigenvalue_spectrum"]), r["batches"], r["batch_size"]]
            for lab, r in hes.items()]
    frags.append(html.table(["run", "max", "min", "all top-k values", "batches", "batch size"], rows))
    return [("Hessian eigenvalues", frags)]
