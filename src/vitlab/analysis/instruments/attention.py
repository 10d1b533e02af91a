"""Instrument ``attention``: attention distance and entropy per head, and the class-token
attention over the input (Dosovitskiy et al., ICLR 2021, Fig. 7; Raghu et al., NeurIPS 2021)."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.data import normalize
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import figure_path, has_contract, progress, successful
from vitlab.analysis.options import positive_int

KEY, NAMES = "attention", ("attention",)
SIZES = (Size("attention_images", (32, 16, 8, 4)),)  # the full default first
WEIGHT = 0.5  # share of --budget


def add_arguments(p) -> None:
    p.add_argument("--attention-images", type=positive_int, default=None,
                   help="images for attention statistics (explicit N x N maps per block); default: 32, fewer "
                        "if --budget needs")


def _images(args, data) -> int:
    return min(args.attention_images, len(data.eval_x))


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind; 3 single-image passes: the layout and the overlay."""
    return {"attention": _images(args, data), "forward": 3}


def cost_line(args, data, model) -> str:
    n = _images(args, data)
    return (f"explicit attention matrices over {n} images (--attention-images) + 3 single-image passes (token "
            f"layout, overlay) = {n + 3} image forward passes")


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis import attention as am
    from vitlab.layers.recording import attention_modules
    if not list(attention_modules(model)):
        return {"skipped": f"{type(model).__name__} has no attention modules to record"}
    args = full(args, SIZES)
    x = normalize(data.eval_x[: args.attention_images], data.norm)
    res = am.attention_statistics(model, x, batch_size=min(args.batch_size, 32), max_images=args.attention_images,
                                  progress=progress(args))
    figs = []
    try:
        grids = [tuple(e.feature.shape[-2:]) for e in model.forward_halves(x[:1])] if has_contract(model) else []
        maps = am.attention_maps(model, x[:1])
        path = os.path.join(out_dir, "attention_overlay.png")
        am.plot_attention_overlay(x[0], maps, path, grids=grids, mean=data.mean, std=data.std,
                                  title=f"class-token attention, label {int(data.eval_y[0])}")
        figs.append("attention_overlay.png")
    except ValueError as exc:
        res["overlay_note"] = str(exc)
    res["figures"] = figs
    return res


def _mean(v):
    return None if v is None else sum(v) / len(v)


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    from vitlab.analysis.attention import plot_attention_statistics
    att = successful(runs, KEY)
    if not att:
        return []
    plot_attention_statistics(att, figure_path(out_dir, "attention_stats.png"))
    frags = [html.figure(figure_path(out_dir, "attention_stats.png"),
                         "Mean attention distance per head and normalised entropy")]
    for lab, r in att.items():
        for f in r.get("figures", []):
            path = os.path.join(run_dirs.get(lab, out_dir), f)
            if os.path.isfile(path):
                frags.append(html.figure(path, f"{lab}: attention over the input"))
    rows = [[lab, n_, r["heads"][i], _mean(r["distance"][i]), _mean(r["distance_px"][i]), _mean(r["entropy"][i]),
             r["entropy_uniform"][i]] for lab, r in att.items() for i, n_ in enumerate(r["names"])]
    frags.append(html.table(["run", "module", "heads", "distance (tokens)", "distance (px)", "entropy (nats)",
                             "log N"], rows))
    return [("Attention maps", frags)]
