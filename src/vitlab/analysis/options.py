"""Argument types and the options of ``vitlab analyze`` that no single instrument owns (what to
analyse, which instruments, shared sizes, the landscape/Hessian loss, misc).  Each instrument
adds its own options (``vitlab.analysis.instruments``)."""
from __future__ import annotations

import argparse
from typing import Callable, List, Sequence

__all__ = ["csv", "int_at_least", "positive_int", "nonneg_int", "nonneg_float", "frequencies", "severities",
           "add_common_arguments", "DEFAULT_MODEL", "DEFAULT_BUDGET"]

DEFAULT_MODEL = "vit_tiny_patch4_28"
# seconds for the instruments' automatic sizes: ViT-S/16 at 224 px finishes in under 5 minutes on 2 cores
DEFAULT_BUDGET = 150.0


def csv(kind: str, valid: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; valid: {', '.join(valid)}")
        return items
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def frequencies(text: str) -> List[float]:
    if text.strip().lower() == "none":
        return []
    try:
        fs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1] or 'none', got {text!r}")
    bad = [f for f in fs if not 0 < f <= 1]
    if bad or not fs:
        raise argparse.ArgumentTypeError(f"noise frequencies must be in (0, 1] (units of pi), got {text!r}")
    return fs


def severities(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"severities must be integers in 1..5 separated by commas, got {text!r}") from None
    if not vals or any(not 1 <= v <= 5 for v in vals):
        raise argparse.ArgumentTypeError(f"severities must be integers in 1..5, got {text!r}")
    return vals


def add_common_arguments(p: argparse.ArgumentParser, instruments: Sequence[str]) -> None:
    src = p.add_argument_group("what to analyse")
    src.add_argument("--checkpoint", help="a vitlab checkpoint (dict with 'model' state dict and 'config')")
    src.add_argument("--model", help=f"a registered model name (untrained unless --checkpoint); 'timm:NAME' builds an "
                                     f"untrained timm model (contract-free instruments only); default {DEFAULT_MODEL}")
    src.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                     help="model overrides, values parsed as JSON (e.g. depth=6 embed_dim=96 mixer=\"cosine\")")
    src.add_argument("--data", default=None,
                     help="'digits' (alias 'mnist': the bundled digits of `vitlab train`) or an ImageFolder root (with train/ and val/ subfolders, "
                          "or one folder used for both); default: the checkpoint's data set, else mnist")
    src.add_argument("--out", default="runs/analyze", help="output folder")
    src.add_argument("--compare", nargs="+", metavar="RUN",
                     help="overlay several runs: analyze output folders (with analysis.json), checkpoints or model "
                          "names (analysed now into OUT/runs/)")
    sel = p.add_argument_group("instruments")
    sel.add_argument("--only", type=csv("instrument", instruments), default=None,
                     help=f"comma-separated subset of: {', '.join(instruments)}")
    sel.add_argument("--skip", type=csv("instrument", instruments), default=[], help="comma-separated instruments to skip")
    size = p.add_argument_group("sizes (cost)")
    size.add_argument("--budget", type=nonneg_float, default=DEFAULT_BUDGET, metavar="SECONDS",
                      help="time for the instruments' sizes that are not given: each selected instrument gets a share "
                           "(by weight), times one small pass of its work and shrinks its default sizes until the "
                           "estimate fits (printed); 0 = no limit (the full defaults). Given sizes always win")
    size.add_argument("--num-images", type=positive_int, default=None,
                      help="evaluation images for Fourier/oversmoothing (one forward pass each; also calibration's "
                           "when --calibration-images is not given); default: 256, fewer if --budget needs")
    size.add_argument("--batch-size", type=positive_int, default=64)
    loss = p.add_argument_group("loss of the landscape and Hessian")
    loss.add_argument("--weight-decay", type=float, default=None,
                      help="l2 coefficient of the landscape/Hessian loss (default: the checkpoint's, else 0)")
    loss.add_argument("--l2", choices=("squared", "norm"), default="squared",
                      help="l2 term: wd/2*sum||θ||² (standard) or wd*sum||θ||₂ (Park & Kim's released convention)")
    misc = p.add_argument_group("misc")
    misc.add_argument("--seed", type=int, default=0)
    misc.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                      help="autocast dtype of the forward passes: auto (bf16 on a CPU with native bf16 for a model at "
                           "least 192 wide, as `vitlab train`), none (float32) or bf16; the Hessian, Lipschitz and "
                           "landscape instruments run in float32 always (analysis.json records each one's dtype)")
    misc.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    misc.add_argument("--no-progress", action="store_true", help="no progress bars")
    misc.add_argument("--traceback", action="store_true", help="show tracebacks (also for instrument failures)")
