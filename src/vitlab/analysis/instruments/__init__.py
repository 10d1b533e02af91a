"""The instruments of ``vitlab analyze``, one module each.

Every module offers ``KEY`` (its entry in ``analysis.json``), ``NAMES`` (what ``--only`` /
``--skip`` call it), ``add_arguments(group)`` (its size options), ``SIZES`` and ``WEIGHT`` (its
sizes' ladders and its share of ``--budget``, :mod:`.budget`), ``work(args, data)`` (units of work
per timed pass kind), ``cost_line(args, data, model)`` (printed before it runs), ``run(model, data,
args, out_dir) -> dict`` and ``report(runs, out_dir, run_dirs) -> [(title, html fragments)]``.
The CLI composes them in the order of :data:`MODULES`.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List

__all__ = ["MODULES", "INSTRUMENTS", "modules", "by_key", "selected_keys"]

MODULES = ("features", "attention", "calibration", "lipschitz", "landscape", "hessian", "robustness")
# what --only / --skip accept, in report order
INSTRUMENTS = ("fourier", "oversmoothing", "attention", "calibration", "lipschitz", "landscape", "hessian",
               "robustness")


def modules() -> List[ModuleType]:
    return [importlib.import_module(f"{__name__}.{m}") for m in MODULES]


def by_key() -> Dict[str, ModuleType]:
    return {m.KEY: m for m in modules()}


def selected_keys(only, skip) -> List[str]:
    """The result keys of the instruments chosen by ``--only`` / ``--skip`` (fourier and
    oversmoothing share one run, ``features``)."""
    chosen = [i for i in (only or INSTRUMENTS) if i not in skip]
    return [m.KEY for m in modules() if any(n in chosen for n in m.NAMES)]
