"""Analysis instruments for vision transformers.

Fourier spectra and variance of feature maps, oversmoothing, attention maps, Lipschitz
bounds, loss landscapes, Hessian spectra, corruption robustness and calibration; see
``docs/analysis.md``.  Submodules load lazily on first use, so ``import vitlab.analysis`` is
cheap (no matplotlib, no scipy).

Entry points: :func:`hessian_eigenvalues`, :func:`expected_calibration_error`,
:func:`lipschitz_upper_bound`, :func:`lipschitz_estimate`, :func:`corrupt` and the rest below.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # calibration
    "calibration_metrics": "calibration",
    "expected_calibration_error": "calibration",
    "reliability_bins": "calibration",
    "plot_reliability_diagram": "calibration",
    # fourier / variance / oversmoothing
    "relative_log_amplitude": "fourier",
    "high_frequency_amplitude": "fourier",
    "feature_map_variance": "fourier",
    "hc_dc_ratio": "oversmoothing",
    "dc_energy_share": "oversmoothing",
    "high_frequency_fraction": "oversmoothing",
    "patch_uniformity": "oversmoothing",
    "attention_collapse": "oversmoothing",
    "feature_statistics": "features",
    # attention maps
    "attention_maps": "attention",
    "attention_statistics": "attention",
    "mean_attention_distance": "attention",
    "attention_entropy": "attention",
    "plot_attention_overlay": "attention",
    # lipschitz
    "lipschitz_upper_bound": "lipschitz",
    "lipschitz_bound_report": "lipschitz",
    "lipschitz_estimate": "lipschitz",
    # landscape / hessian
    "loss_landscape": "landscape",
    "filter_normalized_direction": "landscape",
    "plot_landscape": "landscape",
    "landscape_surface": "landscape",
    "hessian_eigenvalues": "hessian",
    "hessian_density": "hessian",
    "max_eigenvalue_spectrum": "hessian",
    "hessian_vector_product": "hessian",
    # robustness
    "corrupt": "corruptions",
    "CORRUPTIONS": "corruptions",
    "corruption_accuracy": "robustness",
    "band_noise": "robustness",
    "noise_frequency_accuracy": "robustness",
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
