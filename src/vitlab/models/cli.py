"""``vitlab models``: list registered models, optionally with parameters and MACs."""
from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch import nn

__all__ = ["count_params", "count_macs", "add_arguments", "run", "model_table"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: Optional[int] = None, in_chans: Optional[int] = None) -> int:
    """Multiply-accumulates of one forward pass on one image (what papers call "FLOPs"),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).  Counts matmuls,
    convolutions and SDPA; elementwise ops (norms, activations, softmax) are not counted,
    as in fvcore-style counters."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = getattr(model, "default_cfg", {}) or {}
    size = list(cfg.get("input_size", (3, 224, 224)))  # (C, H, W), or (C, T, H, W) for video
    if img_size is not None:
        size[-2:] = [img_size, img_size]
    if in_chans is not None:
        size[0] = in_chans
    p = next(model.parameters())
    x = torch.zeros(1, *size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        # the math SDPA backend decomposes attention into counted matmuls (the fused CPU
        # kernel is not known to the counter)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return fc.get_total_flops() // 2


def _build_and_count(name: str, macs: bool):
    """Build on the meta device (no memory, no init cost) and count there; models whose code
    needs real values (e.g. data-dependent shapes) are built for real instead."""
    from vitlab.models.factory import create_model

    try:
        with torch.device("meta"):
            m = create_model(name)
            g = count_macs(m) if macs else None
    except (NotImplementedError, RuntimeError):
        m = create_model(name)
        g = count_macs(m) if macs else None
    return m, ("-" if g is None else f"{g / 1e9:.2f}")


def model_table(pattern: str = "*", macs: bool = True) -> str:
    """A markdown table of registered models: params (M), GMACs at the default input size."""
    from vitlab.models.factory import list_models

    rows = ["| model | input | params (M) | GMACs |", "|---|---|---:|---:|"]
    for name in list_models(pattern):
        m, g = _build_and_count(name, macs)
        size = "x".join(map(str, m.default_cfg["input_size"]))
        rows.append(f"| {name} | {size} | {count_params(m) / 1e6:.2f} | {g} |")
        del m
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'swin*' (default: all)")
    p.add_argument("--table", action="store_true", help="print a markdown table with parameters and GMACs")
    p.add_argument("--parts", action="store_true", help="print the markdown table of parts x families (docs/parts.md)")
    p.add_argument("--catalogue", action="store_true", help="print the model catalogue (docs/catalogue.md)")


def run(args: argparse.Namespace) -> int:
    from vitlab.models.factory import list_models

    if args.parts:
        from vitlab.models.parts_table import parts_markdown

        print(parts_markdown(), end="")
    elif args.catalogue:
        from vitlab.models.catalogue import catalogue_markdown

        print(catalogue_markdown(), end="")
    elif args.table:
        print(model_table(args.pattern))
    else:
        names = list_models(args.pattern)
        if not names:
            raise ValueError(f"no registered model matches {args.pattern!r}; try 'vitlab models' for all names")
        print("\n".join(names))
    return 0
