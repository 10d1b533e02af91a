"""Instrument ``calibration``: accuracy, NLL, ECE and the uncertainty metrics of Park & Kim
(ICLR 2022, §9), and a reliability diagram (Guo et al., ICML 2017)."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from vitlab.analysis import report as html
from vitlab.analysis.data import normalize
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import successful
from vitlab.analysis.options import positive_int

KEY, NAMES = "calibration", ("calibration",)
METRICS = ["top1", "top5", "nll", "ece", "signed_ece", "brier", "acc90", "unc90", "freq90", "iou", "iou90"]
# the full default first; a user-given --num-images counts as --calibration-images
SIZES = (Size("calibration_images", (256, 128, 64, 32, 16), inherit="num_images"),)
WEIGHT = 0.5  # share of --budget


def add_arguments(p) -> None:
    p.add_argument("--calibration-images", type=positive_int, default=None,
                   help="evaluation images (one forward pass each); default: --num-images if given, else 256, "
                        "fewer if --budget needs")


def _images(args, data) -> int:
    return min(args.calibration_images, len(data.eval_x))


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind."""
    return {"forward": _images(args, data)}


def cost_line(args, data, model) -> str:
    n = _images(args, data)
    return f"one forward pass over {n} images (--calibration-images) = {n} image forward passes"


@torch.no_grad()
def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.calibration import calibration_metrics, plot_reliability_diagram, reliability_bins
    args = full(args, SIZES)
    x = normalize(data.eval_x[: args.calibration_images], data.norm)
    y = data.eval_y[: args.calibration_images]
    probs = torch.cat([model(x[i:i + args.batch_size]).softmax(-1) for i in range(0, len(x), args.batch_size)])
    m = calibration_metrics(probs, y, n_bins=15)
    bins = reliability_bins(probs, y, 15)
    plot_reliability_diagram(probs, y, os.path.join(out_dir, "reliability.png"), n_bins=15)
    return {"metrics": m, "bins": {k: v.tolist() for k, v in bins.items()}, "num_images": len(y),
            "figures": ["reliability.png"]}


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    cal = successful(runs, KEY)
    if not cal:
        return []
    frags = [html.table(["run"] + METRICS, [[lab] + [r["metrics"].get(k) for k in METRICS] for lab, r in cal.items()])]
    for lab, r in cal.items():
        path = os.path.join(run_dirs.get(lab, out_dir), "reliability.png")
        if os.path.isfile(path):
            frags.append(html.figure(path, f"{lab}: reliability diagram"))
    return [("Calibration (Park & Kim 2022 §9)", frags)]
