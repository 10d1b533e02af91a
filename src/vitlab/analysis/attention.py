"""Attention maps: per block and head probabilities, mean attention distance, entropy, overlays.

* Probabilities come from :func:`vitlab.layers.record_attention` (the model contract): softmax
  probabilities for dot-product / cosine attention, the implied N x N matrix
  φ(Q)φ(K)ᵀ (row-normalised) for focused linear attention (Han et al., "FLatten Transformer:
  Vision Transformer using Focused Linear Attention", ICCV 2023).
* Mean attention distance ("attention distance" of Dosovitskiy et al., "An Image is Worth
  16x16 Words", ICLR 2021, Fig. 7; Raghu et al., "Do Vision Transformers See Like
  Convolutional Neural Networks?", NeurIPS 2021): for every patch query i,
  Σ_j a_ij ‖p_i − p_j‖ over the patch keys j (weights renormalised over patch keys, prefix
  tokens dropped), averaged over queries and images; in token units and in pixels.
* Entropy per head: −Σ_j a_ij log a_ij over all keys, averaged over queries and images (nats;
  log N for uniform attention, 0 for one-hot attention).
* Overlays: the class-token (or mean-query) attention of a block, per head, upsampled onto
  the input image; attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
  Transformers", ACL 2020) for isotropic models.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vitlab.layers.recording import record_attention
from vitlab.plotting import pyplot, save_figure

__all__ = ["attention_maps", "is_signed", "token_layout", "mean_attention_distance", "attention_entropy",
           "attention_statistics", "attention_rollout", "plot_attention_overlay", "plot_attention_statistics"]


def _check_probs(probs: torch.Tensor, what: str = "") -> torch.Tensor:
    if not torch.is_tensor(probs) or probs.dim() != 4:
        raise ValueError(f"expected attention probabilities of shape (B, heads, N_query, N_key), "
                         f"got {getattr(probs, 'shape', type(probs).__name__)}")
    if what and is_signed(probs):
        raise ValueError(f"{what} needs attention probabilities; this map has entries down to "
                         f"{probs.min().item():.3g} (a signed map, e.g. differential attention's softmax1 - "
                         "lambda softmax2)")
    return probs.detach().double()


def is_signed(probs: torch.Tensor) -> bool:
    """True for a recorded map with negative entries (beyond float rounding), which is not a probability map:
    differential attention ("Differential Transformer", Ye et al., ICLR 2025) records ``softmax1 - lambda
    softmax2``.  Entropy and attention distance are not defined for it."""
    return bool((probs < -1e-6).any())


@torch.no_grad()
def attention_maps(model: torch.nn.Module, images: torch.Tensor, layouts: bool = False):
    """``{module name: probabilities (B', heads, N_query, N_key)}`` for one batch, in module
    order (B' = B·windows for window attention); with ``layouts=True`` also ``{module name:
    TokenLayout of the keys of one group, or None}`` as recorded by the attention itself.  Uses only
    ``record_attention``; the model is put in eval mode while it runs."""
    was = model.training
    model.eval()
    try:
        with record_attention(model) as rec:
            model(images)
        return (rec.last(), rec.last_layouts()) if layouts else rec.last()
    finally:
        model.train(was)


def _layout_of(probs: torch.Tensor, recorded, grids) -> Optional[Tuple[int, Tuple[int, int]]]:
    """``(num_prefix, grid)`` of a self-attention map: the layout its attention recorded (a window, a
    stripe, the whole map).  ``None`` (no distance) when queries and keys differ (reduced keys, class
    queries) or the groups have no one grid (CSwin's two stripe shapes in one call): never a guess."""
    if probs.shape[-1] != probs.shape[-2] or recorded is None or len(recorded.grid) != 2:
        return None
    return recorded.num_prefix, tuple(recorded.grid)


def token_layout(n_keys: int, grids: Sequence[Tuple[int, int]] = (), max_prefix: int = 2) -> Optional[Tuple[int, Tuple[int, int]]]:
    """Guess ``(num_prefix, (h, w))`` of ``n_keys`` tokens: a known patch grid from ``grids`` (plus up
    to ``max_prefix`` class/distillation tokens), else a square window without prefix; ``None`` when
    neither fits (e.g. CSwin stripes)."""
    for p in range(max_prefix + 1):
        for h, w in grids:
            if n_keys == p + h * w:
                return p, (h, w)
    side = int(round(math.sqrt(n_keys)))
    if side * side == n_keys:
        return 0, (side, side)
    return None


def _grid_positions(hw: Tuple[int, int]) -> torch.Tensor:
    h, w = hw
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=1)  # raster order


def mean_attention_distance(probs: torch.Tensor, grid: Tuple[int, int], num_prefix: int = 0,
                            scale: float = 1.0) -> torch.Tensor:
    """Mean attention distance per head, a ``(heads,)`` float64 tensor.

    ``probs`` (B, heads, P + h·w, P + h·w) with ``num_prefix`` = P leading tokens; ``grid`` = (h, w)
    in raster order.  For each patch query, Σ_j a_ij ‖p_i − p_j‖ / Σ_j a_ij over patch keys
    (Euclidean distance on the grid, times ``scale``, e.g. the patch size for pixels), then the
    mean over queries and batch.  Dosovitskiy et al. (ICLR 2021); Raghu et al. (NeurIPS 2021).
    """
    p = _check_probs(probs, "mean attention distance")
    h, w = grid
    if p.shape[-1] != num_prefix + h * w or p.shape[-2] != num_prefix + h * w:
        raise ValueError(f"attention of shape {tuple(p.shape)} does not match {num_prefix} prefix tokens "
                         f"+ a {h}x{w} grid ({num_prefix + h * w} tokens)")
    a = p[..., num_prefix:, num_prefix:]
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    pos = _grid_positions(grid)
    dist = torch.cdist(pos, pos) * scale  # (N, N)
    return (a * dist).sum(-1).mean(dim=(0, 2))


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy −Σ_j a_ij log a_ij (nats) of every query's attention row, averaged over queries and
    batch: a ``(heads,)`` float64 tensor.  Rows are renormalised to sum to 1 first (the implied
    matrix of linear attention sums to 1 − O(1e-6))."""
    p = _check_probs(probs, "attention entropy")
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return ent.mean(dim=(0, 2))


def _pixels_per_token(probs, batch, lay, grids, img_hw) -> Optional[float]:
    """Pixel size of one token: B' = batch·windows, so the windows tile a stage grid of
    windows·N_key tokens (N_key − prefix for full-grid attention); None when no grid fits."""
    if lay is None or img_hw is None or probs.shape[0] % batch:
        return None
    windows = probs.shape[0] // batch
    area = windows * (lay[1][0] * lay[1][1])
    for h, w in grids:
        if h * w == area:
            return img_hw[0] / h
    return None


def _grids_of(model, images) -> Tuple[List[Tuple[int, int]], Tuple[int, int]]:
    """Patch grids of every stage (from ``forward_halves``) and the input size."""
    grids: List[Tuple[int, int]] = []
    if hasattr(model, "forward_halves"):
        with torch.no_grad():
            for e in model.forward_halves(images[:1]):
                hw = tuple(e.feature.shape[-2:])
                if hw not in grids:
                    grids.append(hw)
    return grids, tuple(images.shape[-2:])


@torch.no_grad()
def attention_statistics(model: torch.nn.Module, images, batch_size: int = 32, max_images: Optional[int] = 64,
                         progress: bool = False) -> Dict:
    """Per attention module: mean attention distance (tokens and pixels) and entropy per head,
    plus the distance from the uniform (low-pass) filter ‖A − 1/N‖_F (Wang et al., ICLR 2022).

    Returns ``{"names", "shapes", "heads", "distance" (list of per-head lists, token units, None
    when the token layout is unknown), "distance_px", "entropy", "entropy_uniform" (log N_key),
    "low_pass_distance", "signed", "num_images"}``; a module whose maps have negative entries (``signed``:
    differential attention) gets ``None`` for distance and entropy, which need probabilities.  Cost: one forward pass with explicit attention
    matrices per batch (memory B·heads·N² per block).
    """
    from vitlab.analysis.features import iterate_images
    from vitlab.analysis.oversmoothing import low_pass_distance

    acc: Dict[str, Dict] = {}
    layout: Dict[str, Optional[Tuple[int, Tuple[int, int]]]] = {}
    grids: List[Tuple[int, int]] = []
    img_hw = None
    n = 0
    it = iterate_images(images, batch_size, max_images)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="attention", leave=False)
    for x in it:
        if not grids:
            grids, img_hw = _grids_of(model, x)
        maps, recorded = attention_maps(model, x, layouts=True)
        b = x.shape[0]
        for name, probs in maps.items():
            if name not in acc:
                layout[name] = _layout_of(probs, recorded.get(name), grids)
                acc[name] = {"dist": 0.0, "ent": 0.0, "lpd": 0.0, "shape": tuple(probs.shape[1:]), "signed": False,
                             "px": _pixels_per_token(probs, b, layout[name], grids, img_hw)}
            a = acc[name]
            a["signed"] = a["signed"] or is_signed(probs)  # no entropy or distance for a signed map
            lay = layout[name]
            if lay is not None and not a["signed"]:
                a["dist"] = a["dist"] + mean_attention_distance(probs, lay[1], lay[0]) * b
            if not a["signed"]:
                a["ent"] = a["ent"] + attention_entropy(probs) * b
            a["lpd"] = a["lpd"] + low_pass_distance(probs) * b
        n += b
    if n == 0:
        raise ValueError("no images to analyse (empty image set)")
    names = list(acc)
    out = {"names": names, "shapes": [list(acc[k]["shape"]) for k in names],
           "heads": [acc[k]["shape"][0] for k in names], "distance": [], "distance_px": [], "entropy": [],
           "entropy_uniform": [math.log(acc[k]["shape"][-1]) for k in names], "low_pass_distance": [],
           "layout": [], "signed": [acc[k]["signed"] for k in names], "num_images": n}
    for k in names:
        lay, signed = layout[k], acc[k]["signed"]
        d = (acc[k]["dist"] / n).tolist() if lay is not None and not signed else None
        out["distance"].append(d)
        px = acc[k]["px"]
        out["distance_px"].append([v * px for v in d] if (d is not None and px) else None)
        out["layout"].append(None if lay is None else {"num_prefix": lay[0], "grid": list(lay[1])})
        out["entropy"].append(None if signed else (acc[k]["ent"] / n).tolist())
        out["low_pass_distance"].append((acc[k]["lpd"] / n).tolist())
    return out


def attention_rollout(maps: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020): Π_l (residual·I + (1 − residual)·Ā_l) with
    Ā_l the head mean, rows renormalised; all maps must share one shape (B, heads, N, N).
    Returns (B, N, N)."""
    if not maps:
        raise ValueError("attention_rollout needs at least one attention map")
    shape = maps[0].shape
    out = None
    for a in maps:
        if a.shape != shape or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention rollout needs maps of one square shape, got {tuple(shape)} and {tuple(a.shape)}")
        m = a.detach().double().mean(1)
        m = residual * torch.eye(m.shape[-1], dtype=m.dtype) + (1 - residual) * m
        m = m / m.sum(-1, keepdim=True)
        out = m if out is None else m @ out
    return out


def _query_map(probs: torch.Tensor, num_prefix: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(heads, h, w): the class token's attention to the patches, or the mean over patch queries
    when there is no class token; for the first image."""
    p = probs[0].detach().double()
    rows = p[:, 0, num_prefix:] if num_prefix else p[:, :, :].mean(1)
    return rows.reshape(p.shape[0], *grid)


def _displayable(image: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """``image`` (C, H, W) with its normalisation undone, clamped to [0, 1] for display."""
    img = image.detach().double().cpu()
    if mean is not None and std is not None:
        img = img * torch.tensor(std, dtype=img.dtype)[:, None, None] + torch.tensor(mean, dtype=img.dtype)[:, None, None]
    return img.clamp(0, 1)


def plot_attention_overlay(image: torch.Tensor, maps: Dict[str, torch.Tensor], path, grids=(),
                           blocks: Optional[Sequence[str]] = None, max_heads: int = 6, mean=None, std=None,
                           title: Optional[str] = None):
    """A grid of images: one row per chosen attention module (default: first, middle and last
    module with a patch-grid layout), one column per head (up to ``max_heads``) plus the
    rollout row when the maps allow it; each cell is the class-token attention (or mean-query
    attention) over the patches, bilinearly upsampled and drawn over the input image.

    ``maps`` are the attention maps of that one image (``attention_maps(model, image[None])``);
    ``grids`` the patch grids of ``forward_halves``.  ``image`` is one (C, H, W) image (normalised with ``mean``/``std`` if given, which are undone
    for display)."""
    plt = pyplot()

    img = _displayable(image, mean, std)
    shown = img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy()
    # full-grid attention of this one image (window attention has B' = windows > 1 and is skipped)
    usable = {k: v for k, v in maps.items() if v.shape[0] == 1 and v.shape[-1] == v.shape[-2]
              and token_layout(v.shape[-1], grids) is not None and token_layout(v.shape[-1], grids)[1] in list(grids)}
    if not usable:
        raise ValueError("no full-grid attention map of a single image to draw (window or stripe attention "
                         "cannot be placed on the image; pass maps of one image)")
    names = list(usable)
    if blocks is None:
        blocks = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))
    rows = []
    for name in blocks:
        if name not in usable:
            raise ValueError(f"unknown attention module {name!r}; valid: {', '.join(names)}")
        p_, hw = token_layout(usable[name].shape[-1], grids)
        rows.append((name, _query_map(usable[name], p_, hw)))
    shapes = {tuple(v.shape) for v in usable.values()}
    if len(shapes) == 1 and len(usable) == len(maps):
        p_, hw = token_layout(next(iter(usable.values())).shape[-1], grids)
        r = attention_rollout(list(usable.values()))[0]
        row = r[0, p_:] if p_ else r[p_:, p_:].mean(0)
        rows.append(("rollout", row.reshape(1, *hw)))
    ncols = 1 + min(max_heads, max(m.shape[0] for _, m in rows))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.7 * len(rows)), squeeze=False)
    h_img, w_img = img.shape[-2:]
    for r, (name, m) in enumerate(rows):
        axes[r, 0].imshow(shown, cmap=None if img.shape[0] == 3 else "gray")
        axes[r, 0].set_ylabel(name, fontsize=6)
        for c in range(ncols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c > m.shape[0]:
                axes[r, c].axis("off")
        for hd in range(min(m.shape[0], ncols - 1)):
            up = torch.nn.functional.interpolate(m[hd][None, None], size=(h_img, w_img), mode="bilinear",
                                                 align_corners=False)[0, 0]
            ax = axes[r, hd + 1]
            ax.imshow(shown, cmap=None if img.shape[0] == 3 else "gray")
            ax.imshow(up.numpy(), cmap="inferno", alpha=0.6)
            if r == 0:
                ax.set_title("mean" if name == "rollout" else f"head {hd}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_attention_statistics(results: Dict[str, Dict], path):
    """Mean attention distance (per head, dots; mean, line) and entropy / log N per attention
    module vs normalised depth; one colour per model."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, r) in enumerate(results.items()):
        color = f"C{i}"
        n = len(r["names"])
        depth = [j / max(n - 1, 1) for j in range(n)]
        xs, ms = [], []
        for d, dist in zip(depth, r["distance"]):
            if dist is None:
                continue
            ax1.scatter([d] * len(dist), dist, s=6, color=color, alpha=0.5)
            xs.append(d)
            ms.append(sum(dist) / len(dist))
        if xs:
            ax1.plot(xs, ms, color=color, label=label)
        ent = [(d, sum(e) / len(e) / u if u > 0 else 0.0) for d, e, u in zip(depth, r["entropy"],
                                                                               r["entropy_uniform"]) if e is not None]
        if ent:  # signed maps (differential attention) have no entropy
            ax2.plot(*zip(*ent), marker="o", ms=3, color=color, label=label)
    ax1.set_xlabel("normalised depth (attention modules)")
    ax1.set_ylabel("mean attention distance (tokens)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("normalised depth (attention modules)")
    ax2.set_ylabel("entropy / log N")
    ax2.set_ylim(0, 1.05)
    ax2.legend(fontsize=8)
    return save_figure(fig, path)
