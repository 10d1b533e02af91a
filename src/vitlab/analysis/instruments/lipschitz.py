"""Instrument ``lipschitz``: the LipsFormer-style upper bound of the model's Lipschitz constant
(Qi et al., ICLR 2023) and an empirical lower estimate by power iteration on JᵀJ."""
from __future__ import annotations

from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.data import normalize
from vitlab.analysis.instruments.common import successful
from vitlab.analysis.options import positive_int

KEY, NAMES = "lipschitz", ("lipschitz",)
# runs in float32 under any --amp (vitlab.analysis.runner)
FLOAT32 = ("the bound multiplies per-layer norms and the estimate iterates Jacobian-vector products; bf16 rounding "
           "compounds through both")


def add_arguments(p) -> None:
    p.add_argument("--lipschitz-images", type=positive_int, default=4)
    p.add_argument("--lipschitz-iters", type=positive_int, default=20,
                   help="power iterations on J^T J (2 backward passes each)")


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.lipschitz import lipschitz_bound_report, lipschitz_estimate
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
