"""Instrument ``hessian``: the per-batch max-eigenvalue spectrum (Park & Kim 2022 §7) by Lanczos
and the eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., ICML 2019)."""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.data import augmented_batches
from vitlab.analysis.instruments.common import figure_path, num_classes, progress, successful
from vitlab.analysis.options import nonneg_int, positive_int
from vitlab.plotting import pyplot, save_figure

KEY, NAMES = "hessian", ("hessian",)
# runs in float32 under any --amp (vitlab.analysis.runner)
FLOAT32 = ("Hessian-vector products differentiate the gradient a second time; bf16 rounding (3 significant digits) "
           "swamps the Lanczos recurrence")


def add_arguments(p) -> None:
    p.add_argument("--hessian-k", type=positive_int, default=5, help="top eigenvalues per mini-batch")
    p.add_argument("--hessian-batches", type=positive_int, default=1,
                   help="augmented mini-batches for the max-eigenvalue spectrum")
    p.add_argument("--hessian-batch-size", type=positive_int, default=16)
    p.add_argument("--hessian-iters", type=positive_int, default=30,
                   help="Lanczos iterations per batch (one Hessian-vector product = ~2 backward passes each)")
    p.add_argument("--hessian-density-steps", type=nonneg_int, default=20,
                   help="stochastic Lanczos quadrature steps for the eigenvalue density (0 = off)")


def _batches(model, data, args):
    n = args.hessian_batches * args.hessian_batch_size
    off = args.landscape_images  # different images from the landscape's
    x, y = data.train_x[off:off + n], data.train_y[off:off + n]
    if len(x) < n:
        x, y = data.train_x[:n], data.train_y[:n]
    return augmented_batches(x, y, num_classes(model, data), args.hessian_batch_size, args.seed + 1, data.norm)


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.hessian import hessian_density, max_eigenvalue_spectrum
    from vitlab.analysis.landscape import soft_cross_entropy
    batches = _batches(model, data, args)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"  hessian: {args.hessian_batches} batches x {args.hessian_iters} Lanczos steps (+{args.hessian_density_steps}"
          f" for the density) Hessian-vector products on {params:,} parameters; Lanczos basis "
          f"{args.hessian_iters * params * 8 / 2 ** 30:.2f} GiB", file=sys.stderr)
    wd = args.weight_decay if args.l2 == "squared" else 0.0
    spec = max_eigenvalue_spectrum(model, soft_cross_entropy, batches, k=args.hessian_k, weight_decay=wd,
                                   method="lanczos", max_iter=args.hessian_iters, progress=progress(args))
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
