"""Analysis instruments for vision transformers (lazy: submodules load on first use)."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "calibration_metrics": "calibration",
    "expected_calibration_error": "calibration",
    "reliability_bins": "calibration",
    "plot_reliability_diagram": "calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vitlab.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
