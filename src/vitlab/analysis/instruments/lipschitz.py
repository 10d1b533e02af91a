"""Instrument ``lipschitz``: the LipsFormer-style upper bound of the model's Lipschitz constant
(Qi et al., ICLR 2023) and an empirical lower estimate by power iteration on JᵀJ."""
from __future__ import annotations

from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.data import normalize
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import successful
from vitlab.analysis.options import positive_int

KEY, NAMES = "lipschitz", ("lipschitz",)
# runs in float32 under any --amp (vitlab.analysis.runner)
FLOAT32 = ("the bound multiplies per-layer norms and the estimate iterates Jacobian-vector products; bf16 rounding "
           "compounds through both")


# the full defaults first, then what the budget may choose
SIZES = (Size("lipschitz_iters", (20, 15, 10, 5)), Size("lipschitz_images", (4, 2, 1)))
WEIGHT = 1.0  # share of --budget


def add_arguments(p) -> None:
    p.add_argument("--lipschitz-images", type=positive_int, default=None,
                   help="images for the estimate; default: 4, fewer if --budget needs")
    p.add_argument("--lipschitz-iters", type=positive_int, default=None,
                   help="power iterations on J^T J (3 backward passes each, double backward); default: 20, fewer "
                        "if --budget needs")


def _images(args, data) -> int:
    return min(args.lipschitz_images, len(data.eval_x))


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind: an iteration costs about one Hessian-vector product."""
    n = _images(args, data)
    return {"hvp": n * args.lipschitz_iters, "forward": n + 1}


def cost_line(args, data, model) -> str:
    n, it = _images(args, data), args.lipschitz_iters
    return (f"upper bound from the weights (one single-image pass records the shapes) + power iteration on JᵀJ: "
            f"{it} iterations (--lipschitz-iters) x 3 backward passes over {n} images (--lipschitz-images) = "
            f"{n + 1} image forward passes, {3 * it * n} image backward passes")


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.lipschitz import lipschitz_bound_report, lipschitz_estimate
    args = full(args, SIZES)
    rep = lipschitz_bound_report(model)
    x = normalize(data.eval_x[: args.lipschitz_images], data.norm)
    est = lipschitz_estimate(model, x, iters=args.lipschitz_iters, seed=args.seed)
    return {"upper_bound": rep["bound"], "log10_upper_bound": rep["log10_bound"], "unbounded_parts": rep["unbounded"],
            "estimate": est, "estimate_images": len(x), "estimate_iters": args.lipschitz_iters,
            "num_factors": len(rep["factors"])}


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    lip = successful(runs, KEY)
    if not lip:
        return []
    rows = [[lab, r["upper_bound"], r["log10_upper_bound"], r["estimate"], ", ".join(r["unbounded_parts"]) or "–"]
            for lab, r in lip.items()]
    return [("Lipschitz constant (LipsFormer, Qi et al. 2023)", [
        html.table(["run", "upper bound", "log10 bound", "empirical lower estimate", "parts without a finite bound"],
                   rows)])]
