"""Instrument ``fourier`` / ``oversmoothing``: Fourier spectra and variance of the feature maps
(Park & Kim, "How Do Vision Transformers Work?", ICLR 2022) and oversmoothing statistics
(Wang et al., "Anti-Oversmoothing in Deep Vision Transformers", ICLR 2022), from one pass of
``forward_halves``."""
from __future__ import annotations

from typing import Dict, List, Tuple

from vitlab.analysis import report as html
from vitlab.analysis.data import normalize
from vitlab.analysis.instruments.budget import Size, full
from vitlab.analysis.instruments.common import figure_path, has_contract, successful

KEY, NAMES = "features", ("fourier", "oversmoothing")
# --num-images (a common option): the full default first, then what the budget may choose
SIZES = (Size("num_images", (256, 128, 64, 32, 16)),)
WEIGHT = 1.0  # share of --budget


def add_arguments(p) -> None:
    """Sizes: ``--num-images`` and ``--batch-size`` (common options)."""


def _images(args, data) -> int:
    return min(args.num_images, len(data.eval_x))


def work(args, data) -> Dict[str, float]:
    """Units of work per probe kind (:data:`vitlab.analysis.instruments.budget.PROBES`)."""
    return {"features": _images(args, data)}


def cost_line(args, data, model) -> str:
    n = _images(args, data)
    return (f"forward_halves keeping every block's output, then a 2-D FFT of each feature map, over {n} images "
            f"(--num-images) = {n} image forward passes")


def run(model, data, args, out_dir) -> Dict:
    from vitlab.analysis.features import feature_statistics
    if not has_contract(model):
        return {"skipped": f"{type(model).__name__} does not implement the vitlab model contract (forward_halves)"}
    args = full(args, SIZES)
    x = normalize(data.eval_x[: args.num_images], data.norm)
    return feature_statistics(model, x, batch_size=args.batch_size, max_images=args.num_images)


def report(runs: Dict[str, Dict], out_dir: str, run_dirs: Dict[str, str]) -> List[Tuple[str, List[str]]]:
    from vitlab.analysis import fourier
    feats = successful(runs, KEY)
    if not feats:
        return []
    P = lambda name: figure_path(out_dir, name)  # noqa: E731
    fourier.plot_fourier(feats, P("fourier.png"))
    fourier.plot_variance(feats, P("variance.png"))
    fourier.plot_variance(feats, P("oversmoothing_cos.png"), key="cos_sim", ylabel="mean pairwise cosine similarity",
                          log=False)
    fourier.plot_variance(feats, P("oversmoothing_dc.png"), key="dc_share", ylabel="DC energy share", log=False)
    rows = [[lab, n_, f["kinds"][i], f["high_freq"][i], f["variance"][i], f["cos_sim"][i], f["dc_share"][i],
             f["hc_dc"][i]] for lab, f in feats.items() for i, n_ in enumerate(f["names"])]
    return [("Fourier analysis of feature maps (Park & Kim 2022)", [
                html.figure(P("fourier.png"), "Relative log amplitude Δ(f) by depth; Δ at the highest frequency vs "
                                              "normalised depth (attention halves shaded)"),
                html.figure(P("variance.png"), "Feature-map variance vs normalised depth")]),
            ("Oversmoothing (Wang et al. 2022)", [
                html.figure(P("oversmoothing_cos.png"), "Mean pairwise cosine similarity of patch tokens"),
                html.figure(P("oversmoothing_dc.png"), "Share of token energy in the DC component"),
                "<details><summary>per-block numbers</summary>" + html.table(
                    ["run", "block", "kind", "Δ high freq", "variance", "cos sim", "DC share", "‖HC‖/‖DC‖"], rows)
                + "</details>"])]
