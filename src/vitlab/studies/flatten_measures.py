"""The measures of the ``focused_linear`` study that no instrument of ``vitlab analyze`` takes yet:
the rank of attention matrices (with the depthwise-conv term as a banded matrix, FLatten's rank
figure), attention entropy per block, and time / peak memory against the number of tokens (the
step and meters of ``vitlab bench``)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["dwc_off", "dwc_band", "numerical_rank", "rank_and_entropy", "cost_vs_tokens", "log_slope"]


def dwc_off(model: str, model_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """Core options that switch the depthwise conv off: ``kernel_size=0`` where the core takes it,
    else the smallest DWC (``kernel_size=1``, a per-channel scale of V without spatial mixing) and a
    note saying so."""
    from vitlab import create_model

    try:
        with torch.device("meta"):
            create_model(model, mixer="focused_linear", mixer_kwargs=dict(kernel_size=0), **model_kwargs)
        return {"kernel_size": 0}, ""
    except (ValueError, TypeError):
        return {"kernel_size": 1}, ("The focused_linear core cannot switch its depthwise conv off (kernel_size must be "
                                    "odd); the 'no DWC' variants use kernel_size=1, a 1x1 depthwise conv: a learned "
                                    "per-channel scale of V with no spatial mixing. Their rank is reported without a "
                                    "DWC term.")


def dwc_band(kernel: torch.Tensor, grid: Sequence[int], num_prefix: int = 0) -> torch.Tensor:
    """The depthwise conv with ``kernel`` (k x k, zero padding) on a ``grid`` of patch tokens in raster
    order as an (P + h w) x (P + h w) matrix; prefix rows and columns are zero, taps that fall off the
    map (or would wrap to the next row) are dropped."""
    h, w = int(grid[0]), int(grid[1])
    k = kernel.shape[-1]
    r = k // 2
    n = num_prefix + h * w
    band = torch.zeros(n, n, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            i = num_prefix + y * w + x
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        band[i, num_prefix + yy * w + xx] = float(kernel[dy + r, dx + r])
    return band


def _dwc_kernels(model) -> Dict[str, torch.Tensor]:
    """Attention module name -> its DWC kernel (first channel), read from the state dict
    (``<module>.dwc.weight``: the checkpoint format of the focused_linear core)."""
    return {k[: -len(".dwc.weight")]: v[0, 0].detach() for k, v in model.state_dict().items()
            if k.endswith(".dwc.weight")}


def numerical_rank(m: torch.Tensor) -> torch.Tensor:
    """Rank of each matrix of ``m`` (..., N, N) at float32 precision: singular values above
    N * eps(float32) times the largest (the maps are computed in float32, so float64's tolerance
    would count rounding noise as rank)."""
    return torch.linalg.matrix_rank(m.double(), rtol=m.shape[-1] * torch.finfo(torch.float32).eps)


def _ranks(probs: torch.Tensor, band: Optional[torch.Tensor]) -> Tuple[float, float]:
    a = probs.detach().double()
    rank = float(numerical_rank(a).double().mean())
    if band is None:
        return rank, rank
    m = (a + band).abs()
    m = m / m.sum(-1, keepdim=True).clamp_min(1e-300)
    return rank, float(numerical_rank(m).double().mean())


@torch.no_grad()
def rank_and_entropy(model, data, n_images: int, has_dwc: bool) -> Dict[str, Any]:
    """Per attention block: mean rank of the N x N attention matrices (all heads, ``n_images``
    images), the same with the DWC term, and entropy / log N; plus their means over blocks."""
    from vitlab.analysis.attention import attention_entropy, attention_maps
    from vitlab.analysis.data import normalize

    x = normalize(data.eval_x[:n_images], data.norm)
    maps, layouts = attention_maps(model, x, layouts=True)
    kernels = _dwc_kernels(model) if has_dwc else {}
    per: Dict[str, List[float]] = {"rank": [], "rank_dwc": [], "entropy_norm": [], "tokens": []}
    for name, probs in maps.items():
        lay = layouts.get(name)
        band = None
        if name in kernels and lay is not None:
            band = dwc_band(kernels[name], lay.grid, lay.num_prefix)
        rank, rank_dwc = _ranks(probs, band)
        n = probs.shape[-1]
        per["rank"].append(rank)
        per["rank_dwc"].append(rank_dwc)
        per["entropy_norm"].append(float(attention_entropy(probs).mean()) / math.log(n))
        per["tokens"].append(n)
    mean = {k: (sum(v) / len(v) if v else None) for k, v in per.items() if k != "tokens"}
    n = per["tokens"][0] if per["tokens"] else None
    return {**mean, "rank_fraction": (mean["rank_dwc"] / n) if n else None, "tokens": n, "per_block": per}


def log_slope(xs: Sequence[float], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Slope of log y against log x between the last two points with positive values."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0 and x > 0]
    if len(pts) < 2:
        return None
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    return (math.log(y1) - math.log(y0)) / (math.log(x1) - math.log(x0))


def _measure(model, size: int, batch: int, runs: int) -> Tuple[float, Optional[float]]:
    from vitlab.bench import StepSpec, make_step, peak_step_memory, time_steps

    step = make_step(model, StepSpec(batch_size=batch, input_size=(3, size, size), train=False))
    times = sorted(time_steps(step, runs=runs, warmup=1))
    try:
        mem = float(peak_step_memory(step))
    except (RuntimeError, ValueError):
        mem = None
    return times[len(times) // 2] / batch, mem


def cost_vs_tokens(base: str, model_kwargs: Dict[str, Any], variants: Dict[str, Dict[str, Any]],
                   sizes: Sequence[int], batch: int, runs: int) -> Dict[str, Any]:
    """Forward seconds per image and peak step memory of each variant (untrained, same seed) at each
    image size, against the number of tokens N; plus the log-log slopes at the largest N."""
    from vitlab import create_model

    patch = int(model_kwargs.get("patch_size", 4))  # the studies' base models take 4-pixel patches
    out: Dict[str, Any] = {"sizes": list(sizes), "tokens": [], "batch": batch, "runs": runs, "models": {}}
    for label, kw in variants.items():
        secs, mems, tokens = [], [], []
        for size in sizes:
            torch.manual_seed(0)
            model = create_model(base, img_size=size, num_classes=10, **dict(model_kwargs, **kw))
            tokens.append((size // patch) ** 2)
            t, m = _measure(model, size, batch, runs)
            secs.append(t)
            mems.append(m)
        out["tokens"] = tokens
        out["models"][label] = {"seconds": secs, "memory": mems, "time_slope": log_slope(tokens, secs),
                                "memory_slope": log_slope(tokens, mems)}
    return out
