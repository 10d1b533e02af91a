"""``vitlab analyze``: run the analysis instruments on a model and write a report.

    vitlab analyze --model vit_tiny_patch4_28 --data mnist --out runs/an_vit
    vitlab analyze --checkpoint runs/train/last.pt --data ../shared/data/cifar10 --out runs/an
    vitlab analyze --compare runs/an_vit runs/an_featscale --out runs/cmp

Writes ``OUT/analysis.json`` (every number), the PNGs and ``OUT/report.html`` (one self-contained
page).  Every instrument can be switched with ``--only`` / ``--skip``, takes size options and
prints its cost before it starts; the sizes not given shrink to fit ``--budget`` seconds
(:mod:`vitlab.analysis.instruments.budget`).  ``--compare`` takes earlier analyze output folders (or
checkpoints / model names, analysed on the fly into ``OUT/runs/``) and overlays them.

This module only composes: the common options (:mod:`vitlab.analysis.options`), one module per
instrument with its options, run and report section (:mod:`vitlab.analysis.instruments`), the
data (:mod:`vitlab.analysis.data`), the model (:mod:`vitlab.analysis.loading`), the run
(:mod:`vitlab.analysis.runner`) and the page (:mod:`vitlab.analysis.render`).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict

import torch

from vitlab.analysis import instruments
from vitlab.analysis.data import Data, augmented_batches, load_data
from vitlab.analysis.instruments import INSTRUMENTS
from vitlab.analysis.loading import build_model
from vitlab.analysis.options import DEFAULT_MODEL, add_common_arguments
from vitlab.analysis.render import render_report
from vitlab.analysis.runner import analyze
from vitlab.errors import UserError

__all__ = ["add_arguments", "run", "INSTRUMENTS", "DEFAULT_MODEL", "Data", "load_data", "build_model", "analyze",
           "render_report", "augmented_batches"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    add_common_arguments(p, INSTRUMENTS)
    for module in instruments.modules():
        module.add_arguments(p.add_argument_group(f"{module.KEY} ({', '.join(module.NAMES)})"))


def _unique(label: str, taken: Dict) -> str:
    out, i = label, 2
    while out in taken:
        out, i = f"{label}_{i}", i + 1
    return out


def _compare_item(args, item: str, runs: Dict, dirs: Dict) -> None:
    """Add one ``--compare`` item (an analyze folder / analysis.json, a checkpoint or a model name)."""
    path = os.path.join(item, "analysis.json") if os.path.isdir(item) else item
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path) as f:
            r = json.load(f)
        lab = _unique(r.get("label") or os.path.basename(os.path.normpath(item)), runs)
        runs[lab], dirs[lab] = r, os.path.dirname(os.path.abspath(path))
        return
    sub = argparse.Namespace(**vars(args))
    sub.compare = None
    if os.path.isfile(item):
        sub.checkpoint, sub.model = item, None
        lab = os.path.splitext(os.path.basename(item))[0]
    else:
        from vitlab.models.factory import list_models
        if not item.startswith("timm:") and item not in list_models():
            raise UserError(f"--compare item {item!r} is not an analyze folder (no analysis.json), a checkpoint "
                            f"file or a registered model name")
        sub.checkpoint, sub.model = None, item
        lab = item
    lab = _unique(lab, runs)
    d = os.path.join(args.out, "runs", lab.replace(":", "_"))
    runs[lab], dirs[lab] = analyze(sub, d, label=lab), d


def _compare(args) -> str:
    if args.checkpoint or args.model:
        raise UserError("--compare takes its runs as arguments; do not combine it with --checkpoint/--model")
    runs, dirs = {}, {}
    for item in args.compare:
        _compare_item(args, item, runs, dirs)
    from vitlab.analysis.report import write_json
    os.makedirs(args.out, exist_ok=True)
    write_json({"runs": runs}, os.path.join(args.out, "analysis.json"))
    return render_report(runs, args.out, dirs, title="vitlab analyze: " + " vs ".join(runs))


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        path = _compare(args)
    else:
        result = analyze(args, args.out)
        path = render_report({result["label"]: result}, args.out, {result["label"]: args.out},
                             title=f"vitlab analyze: {result['label']}")
    print(f"report: {path}")
    return 0
