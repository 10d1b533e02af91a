"""One pass over evaluation images that gathers every per-block feature statistic
(Fourier, variance, oversmoothing) through ``model.forward_halves``.

Park & Kim, "How Do Vision Transformers Work?" (ICLR 2022) §3.2-§5 and Wang et al.,
"Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis" (ICLR 2022) §7.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from vitlab.analysis import fourier, oversmoothing

__all__ = ["feature_statistics", "iterate_images"]


def iterate_images(images, batch_size: int = 64, max_images: Optional[int] = None, device="cpu"):
    """Yield image batches from a tensor (N, C, H, W), a Dataset of (image, label) or an
    iterable of batches (tensors or (inputs, targets) tuples)."""
    seen = 0
    if torch.is_tensor(images):
        it = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    elif hasattr(images, "__getitem__") and hasattr(images, "__len__") and not isinstance(images, (list, tuple)):
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
        it = (b[0] if isinstance(b, (list, tuple)) else b for b in loader)
    else:
        it = (b[0] if isinstance(b, (list, tuple)) else b for b in images)
    for b in it:
        if max_images is not None:
            if seen >= max_images:
                return
            b = b[: max_images - seen]
        seen += len(b)
        yield b.to(device)


def _accumulate(acc: Dict[str, list], inter, b: int, include_prefix: bool) -> None:
    """Add one batch's per-intermediate sums (Fourier log amplitude, variance, token measures)."""
    for i, e in enumerate(inter):
        f = e.feature
        c, h, w = f.shape[1:]
        if min(h, w) >= 2:
            acc["logamp"][i] = acc["logamp"][i] + fourier.log_amplitude_diagonal(f, reduce="sum")
            acc["logamp_n"][i] += b * c
            acc["var"][i] += fourier.feature_map_variance(f) * b
        t = e.all_tokens if include_prefix else e.tokens
        acc["hc_dc"][i] += oversmoothing.hc_dc_ratio(t) * b
        acc["dc_share"][i] += oversmoothing.dc_energy_share(t) * b
        acc["cos"][i] += oversmoothing.patch_uniformity(t) * b if t.shape[1] > 1 else float("nan")


def _summarise(acc: Dict[str, list], names, kinds, shapes, n_images: int) -> Dict:
    count = len(names)
    curves, high = [], []
    for i in range(count):
        if acc["logamp_n"][i]:
            a = acc["logamp"][i] / acc["logamp_n"][i]
            d = (a - a[0]).tolist()
            curves.append(d)
            high.append(d[-1])
        else:
            curves.append(None)
            high.append(None)
    return {
        "names": names, "kinds": kinds, "shapes": shapes,
        "depth": [i / max(count - 1, 1) for i in range(count)],
        "fourier_curve": curves, "high_freq": high,
        "variance": [acc["var"][i] / n_images if acc["logamp_n"][i] else None for i in range(count)],
        "hc_dc": [v / n_images for v in acc["hc_dc"]],
        "dc_share": [v / n_images for v in acc["dc_share"]],
        "cos_sim": [v / n_images for v in acc["cos"]],
        "num_images": n_images,
    }


@torch.no_grad()
def feature_statistics(model: torch.nn.Module, images, batch_size: int = 64, max_images: Optional[int] = 256,
                       include_prefix: bool = False, device="cpu") -> Dict:
    """Per-block statistics of ``model.forward_halves`` on ``images``.

    Returns a dict of equal-length lists (one entry per intermediate, in order):
    ``names``, ``kinds``, ``depth`` (index / (count − 1)), ``fourier_curve`` (Δ(f) list, or
    None for maps smaller than 2x2), ``high_freq`` (Δ at the highest diagonal frequency),
    ``variance`` (feature-map variance), ``hc_dc`` (‖HC‖/‖DC‖ over tokens), ``dc_share``
    (DC energy share), ``cos_sim`` (patch uniformity), plus ``num_images``.
    Token measures use patch tokens only unless ``include_prefix``.
    Cost: one forward pass per batch with all intermediates kept for that batch.
    """
    if not hasattr(model, "forward_halves"):
        raise ValueError(f"{type(model).__name__} does not implement forward_halves (the model contract)")
    was_training = model.training
    model.eval()
    acc: Dict[str, list] = {}
    names, kinds, shapes = [], [], []
    n_images = 0
    try:
        for x in iterate_images(images, batch_size, max_images, device):
            inter = model.forward_halves(x)
            if not names:
                names = [e.name for e in inter]
                kinds = [e.kind for e in inter]
                shapes = [tuple(e.feature.shape[1:]) for e in inter]
                acc = {k: [0.0] * len(inter) for k in ("logamp", "logamp_n", "var", "hc_dc", "dc_share", "cos")}
            _accumulate(acc, inter, x.shape[0], include_prefix)
            n_images += x.shape[0]
    finally:
        model.train(was_training)
    if n_images == 0:
        raise ValueError("no images to analyse (empty image set)")
    return _summarise(acc, names, kinds, shapes, n_images)
