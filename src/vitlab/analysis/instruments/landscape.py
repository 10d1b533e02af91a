"""Instrument ``landscape``: the loss on a filter-normalised 2-D slice around the weights
(Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018; Park & Kim 2022 §6)."""
from __future__ import annotations

from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.data import augmented_batches
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import figure_path, num_classes, progress, successful
from vitlab.analysis.options import positive_int

KEY, NAMES = "landscape", ("landscape",)
# runs in float32 under any --amp (vitlab.analysis.runner)
FLOAT32 = ("loss differences between neighbouring grid points near the weights are below bf16's resolution of the "
           "logits")


# the full defaults first, then what the budget may choose (images shrink first)
SIZES = (Size("landscape_images", (32, 16, 8, 4, 2)), Size("landscape_steps", (11, 9, 7, 5)))
WEIGHT = 2.0  # share of --budget


def add_arguments(p) -> None:
    p.add_argument("--landscape-steps", type=positive_int, default=None,
                   help="grid side; cost steps^2 + 1 forward passes over --landscape-images; default: 11, fewer "
                        "if --budget needs")
    p.add_argument("--landscape-span", type=float, default=1.0)
    p.add_argument("--landscape-images", type=positive_int, default=None,
                   help="augmented training images; default: 32, fewer if --budget needs")
    p.add_argument("--landscape-norm", choices=("filter", "dim0", "layer"), default="filter",
                   help="direction normalisation: per output filter (Li et al.), along dim 0 (Park & Kim code), layer")


def _images(args, data) -> int:
    return min(args.landscape_images, len(data.train_x))


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind (the grid, then the centre once more)."""
    return {"forward": (args.landscape_steps ** 2 + 1) * _images(args, data)}


def cost_line(args, data, model) -> str:
    s, n = args.landscape_steps, _images(args, data)
    return (f"{s}x{s} grid (--landscape-steps) + the centre again = {s * s + 1} evaluations x {n} augmented "
            f"training images (--landscape-images) = {(s * s + 1) * n} image forward passes")


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.landscape import loss_landscape
    args = full(args, SIZES)
    n = args.landscape_images
    batches = augmented_batches(data.train_x[:n], data.train_y[:n], num_classes(model, data), args.batch_size,
                                args.seed, data.norm)
    return loss_landscape(model, batches, steps=args.landscape_steps, span=args.landscape_span,
                          weight_decay=args.weight_decay, l2=args.l2, norm=args.landscape_norm, seed=args.seed,
                          progress=progress(args))


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    from vitlab.analysis.landscape import plot_landscape
    land = successful(runs, KEY)
    if not land:
        return []
    P = lambda name: figure_path(out_dir, name)  # noqa: E731
    plot_landscape(land, P("landscape.png"))
    plot_landscape(land, P("landscape_3d.png"), surface=True)
    rows = [[lab, r["center"]["nll"], r["center"]["acc"], r["center"]["loss"], r["center"]["l2_norm_sum"],
             r["weight_decay"], r["l2_mode"], f"{r['steps']}x{r['steps']}", r["num_samples"]] for lab, r in land.items()]
    frags = [html.figure(P("landscape.png"), "Loss (NLL + l2 term) − min on a filter-normalised 2-D slice"),
             html.figure(P("landscape_3d.png"), "The same slice as a surface (values above 42 left out)"),
             html.table(["run", "NLL at centre", "acc at centre", "loss at centre", "Σ‖θ‖₂", "weight decay",
                         "l2", "grid", "images"], rows)]
    for lab, r in land.items():
        frags.append(f"<details><summary>{lab}: loss grid (rows y, columns x = {[round(v, 3) for v in r['xs']]})"
                     f"</summary>" + html.table(["y"] + [f"{v:.2f}" for v in r["xs"]],
                                                [[f"{yv:.2f}"] + row for yv, row in zip(r["ys"], r["loss"])])
                     + "</details>")
    return [("Loss landscape (Li et al. 2018; Park & Kim 2022)", frags)]
