"""Instrument ``robustness``: accuracy under the 15 common corruptions (Hendrycks & Dietterich,
ICLR 2019) and under band-limited noise by frequency (Park & Kim 2022, Fig. 3)."""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.instruments.common import figure_path, progress, successful
from vitlab.analysis.options import csv, frequencies, positive_int, severities

KEY, NAMES = "robustness", ("robustness",)


def add_arguments(p) -> None:
    from vitlab.analysis.corruptions import CORRUPTIONS
    from vitlab.analysis.robustness import NOISE_FREQUENCIES

    p.add_argument("--robustness-images", type=positive_int, default=128,
                   help="evaluation images; cost: (#corruptions x #severities + 1) forward passes over them")
    p.add_argument("--corruptions", type=csv("corruption", CORRUPTIONS), default=list(CORRUPTIONS))
    p.add_argument("--severities", type=severities, default=[1, 2, 3, 4, 5])
    p.add_argument("--noise-frequencies", type=frequencies, default=list(NOISE_FREQUENCIES),
                   help="band-noise centres in units of pi, comma-separated (default 0.1,...,0.9); "
                        "'none' skips the noise-frequency part of the robustness instrument")
    p.add_argument("--noise-width", type=float, default=0.1, help="band width in units of pi (default 0.1)")
    p.add_argument("--noise-rms", type=float, default=0.1,
                   help="root-mean-square of the band noise in [0, 1] pixel units (default 0.1)")


def _noise(model, x, batches, data, args) -> Dict:
    from vitlab.analysis.robustness import band_mask, noise_frequency_accuracy

    fs = [f for f in args.noise_frequencies if band_mask(x.shape[-2:], f, args.noise_width, allow_empty=True).any()]
    skipped = [f for f in args.noise_frequencies if f not in fs]
    if skipped:
        print(f"  robustness: no frequency of a {x.shape[-2]}x{x.shape[-1]} image lies in the bands at "
              f"{skipped} (width {args.noise_width} pi): skipped", file=sys.stderr)
    if not fs:
        return {}
    print(f"  robustness: band noise at {len(fs)} frequencies x {len(x)} images", file=sys.stderr)
    res = noise_frequency_accuracy(model, batches, fs, args.noise_width, args.noise_rms, mean=data.mean, std=data.std,
                                   seed=args.seed)
    res["skipped_frequencies"] = skipped
    return {"noise_frequency": res}


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.robustness import corruption_accuracy
    n = args.robustness_images
    x, y = data.eval_x[:n], data.eval_y[:n]
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    print(f"  robustness: {len(args.corruptions)} corruptions x {len(args.severities)} severities x {len(x)} images",
          file=sys.stderr)
    res = corruption_accuracy(model, batches, args.corruptions, args.severities, mean=data.mean, std=data.std,
                              seed=args.seed, progress=progress(args))
    if args.noise_frequencies:
        res.update(_noise(model, x, batches, data, args))
    return res


def _corruption_section(rob: Dict[str, Dict], out_dir: str) -> List[str]:
    from vitlab.analysis.robustness import plot_corruption_table
    plot_corruption_table(rob, figure_path(out_dir, "robustness.png"))
    frags = [html.figure(figure_path(out_dir, "robustness.png"), "Accuracy per corruption (mean over severities)")]
    for lab, r in rob.items():
        sev = [str(s) for s in r["severities"]]
        rows = [[c] + [100 * r["table"][c][s]["acc"] for s in sev] + [100 * r["per_corruption"][c]] for c in r["table"]]
        rows.append(["mean"] + [100 * r["per_severity"][s] for s in sev] + [100 * r["mean_accuracy"]])
        frags.append(f"<h3>{lab}: clean accuracy {100 * r['clean']['acc']:.2f} %, mean corruption accuracy "
                     f"{100 * r['mean_accuracy']:.2f} % ({r['num_images']} images)</h3>")
        frags.append(html.table(["corruption"] + [f"severity {s} (%)" for s in sev] + ["mean (%)"], rows))
    return frags


def _noise_section(nf: Dict[str, Dict], out_dir: str) -> List[str]:
    from vitlab.analysis.robustness import plot_noise_frequency
    plot_noise_frequency(nf, figure_path(out_dir, "noise_frequency.png"))
    fs = next(iter(nf.values()))["frequencies"]
    return [html.figure(figure_path(out_dir, "noise_frequency.png"), "Accuracy change under band-limited noise, by "
                                                                     "frequency (Park & Kim 2022, Fig. 3)"),
            html.table(["run", "clean (%)"] + [f"{f:.2g} pi" for f in fs],
                       [[lab, 100 * r["clean"]["acc"]] + [100 * r["table"][str(f)]["delta_acc"] for f in fs]
                        for lab, r in nf.items()])]


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    rob = successful(runs, KEY)
    sections = []
    if rob:
        sections.append(("Robustness to common corruptions (Hendrycks & Dietterich 2019)",
                         _corruption_section(rob, out_dir)))
    nf = {lab: r["noise_frequency"] for lab, r in rob.items() if "noise_frequency" in r}
    if nf:
        sections.append(("Robustness to noise by frequency (accuracy change, % points)", _noise_section(nf, out_dir)))
    return sections
