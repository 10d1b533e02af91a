"""Calibration instrument of ``vitlab analyze``: the metrics and the reliability diagram.

The metrics themselves live in :mod:`vitlab.engine.metrics` (training and ``vitlab eval`` use
them and the engine must not import analysis); they are re-exported here so
``from vitlab.analysis.calibration import calibration_metrics`` keeps working.  Bin convention:
``(start, end]`` on float64 edges (see :mod:`vitlab.engine.metrics`).
"""
from __future__ import annotations

from vitlab.engine.metrics import (calibration_metrics, expected_calibration_error, plot_reliability_diagram,
                                   reliability_bins)

__all__ = [
    "calibration_metrics",
    "expected_calibration_error",
    "reliability_bins",
    "plot_reliability_diagram",
]
