"""Instrument ``robustness``: accuracy under the 15 common corruptions (Hendrycks & Dietterich,
ICLR 2019) and under band-limited noise by frequency (Park & Kim 2022, Fig. 3)."""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.corruptions import CORRUPTIONS
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import figure_path, progress, successful
from vitlab.analysis.options import csv, frequencies, positive_int, severities
from vitlab.analysis.robustness import NOISE_FREQUENCIES

KEY, NAMES = "robustness", ("robustness",)
# Seconds per image of each corruption (severity 3) at 32 and 224 pixels a side, and per call (a batch) at
# 224 px, measured on this project's 2-core CPU under load 3.4 (2026-11-25, after a warm-up call).  Time
# follows the pixel count linearly between and beyond the two sizes, never below the 32 px cost.
CORRUPTION_SECONDS = {
    "gaussian_noise": (0.005, 0.016, 0), "shot_noise": (0.0065, 0.035, 0), "impulse_noise": (0.005, 0.008, 0),
    "defocus_blur": (0.0095, 0.034, 0), "glass_blur": (0.007, 0.05, 4.6), "motion_blur": (0.0054, 0.78, 0),
    "zoom_blur": (0.0006, 0.0036, 0), "snow": (0.0097, 0.07, 0), "frost": (0.0075, 0.082, 0), "fog": (0.006, 0.019, 0),
    "brightness": (0.005, 0.005, 0), "contrast": (0.006, 0.006, 0), "elastic_transform": (0.044, 0.19, 0),
    "pixelate": (0.0001, 0.012, 0), "jpeg_compression": (0.0001, 0.008, 0)}
# costliest first at 224 px: the order in which the budget leaves corruptions out
_BY_COST = sorted(CORRUPTIONS, key=lambda c: -(CORRUPTION_SECONDS[c][1] + CORRUPTION_SECONDS[c][2] / 16))
# the full defaults first, then what the budget may choose (in turn)
SIZES = (Size("severities", ((1, 2, 3, 4, 5), (1, 3, 5), (3,))),
         Size("robustness_images", (128, 64, 32, 16, 8)),
         Size("noise_frequencies", (NOISE_FREQUENCIES, NOISE_FREQUENCIES[::2], NOISE_FREQUENCIES[::4])),
         Size("corruptions", tuple(tuple(c for c in CORRUPTIONS if c not in _BY_COST[:i]) for i in range(7))))
WEIGHT = 2.0  # share of --budget


def add_arguments(p) -> None:
    p.add_argument("--robustness-images", type=positive_int, default=None,
                   help="evaluation images; cost: (#corruptions x #severities + 1) forward passes over them; "
                        "default: 128, fewer if --budget needs")
    p.add_argument("--corruptions", type=csv("corruption", CORRUPTIONS), default=None,
                   help="comma-separated; default: all 15, the costliest left out first if --budget needs")
    p.add_argument("--severities", type=severities, default=None,
                   help="comma-separated in 1..5; default: 1,2,3,4,5, else 1,3,5 or 3 if --budget needs")
    p.add_argument("--noise-frequencies", type=frequencies, default=None,
                   help="band-noise centres in units of pi, comma-separated (default 0.1,...,0.9, else 0.1,0.3,...,0.9 "
                        "or 0.1,0.5,0.9 if --budget needs); 'none' skips the noise-frequency part of the robustness "
                        "instrument")
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
    res = noise_frequency_accuracy(model, batches, fs, args.noise_width, args.noise_rms, mean=data.mean, std=data.std,
                                   seed=args.seed)
    res["skipped_frequencies"] = skipped
    return {"noise_frequency": res}


def _frequencies(args, data) -> List[float]:
    """The band centres with a frequency of the image grid (the others are skipped)."""
    from vitlab.analysis.robustness import band_mask
    hw = tuple(data.eval_x.shape[-2:])
    return [f for f in args.noise_frequencies if band_mask(hw, f, args.noise_width, allow_empty=True).any()]


def corruption_seconds(name: str, side_px: float, images: int, calls: int) -> float:
    """Estimated seconds to corrupt ``images`` images of ``side_px``² pixels in ``calls`` batches."""
    small, large, per_call = CORRUPTION_SECONDS[name]
    r, r0 = (side_px / 224) ** 2, (32 / 224) ** 2
    per_image = max(small, small + (large - small) * (r - r0) / (1 - r0))
    return images * per_image + calls * per_call * r


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind, and the corruptions' own time (:data:`CORRUPTION_SECONDS`)."""
    n = min(args.robustness_images, len(data.eval_x))
    nf = len(_frequencies(args, data)) if args.noise_frequencies else 0
    calls = -(-n // args.batch_size) * len(args.severities)
    side = float(data.eval_x.shape[-2] * data.eval_x.shape[-1]) ** 0.5
    corrupt = sum(corruption_seconds(c, side, n * len(args.severities), calls) for c in args.corruptions)
    sets = len(args.corruptions) * len(args.severities) + 1 + (nf + 1 if nf else 0)
    return {"forward": n * sets, "seconds": corrupt}


def cost_line(args, data, model) -> str:
    n = min(args.robustness_images, len(data.eval_x))
    nf = len(_frequencies(args, data)) if args.noise_frequencies else 0
    c, s = len(args.corruptions), len(args.severities)
    sets = c * s + 1 + (nf + 1 if nf else 0)
    noise = f" + {nf} band-noise frequencies (--noise-frequencies) and their clean pass" if nf else ""
    left = [k for k in CORRUPTIONS if k not in args.corruptions]
    return (f"{c} corruptions (--corruptions{'; left out: ' + ', '.join(left) if left else ''}) x {s} severities "
            f"(--severities) + clean{noise} = {sets} sets x {n} images (--robustness-images) = {sets * n} image "
            f"forward passes")


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.robustness import corruption_accuracy
    args = full(args, SIZES)
    args.corruptions, args.severities = list(args.corruptions), list(args.severities)
    args.noise_frequencies = list(args.noise_frequencies)
    n = args.robustness_images
    x, y = data.eval_x[:n], data.eval_y[:n]
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
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
