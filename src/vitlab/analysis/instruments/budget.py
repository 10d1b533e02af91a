"""What each instrument of ``vitlab analyze`` costs, and default sizes that fit a time budget.

Every size option of an instrument defaults to ``None`` (automatic).  ``analyze`` times one small
pass of each kind of work the selected instruments need (a forward pass, a Hessian-vector
product, ...: :data:`PROBES`), gives every instrument a share of ``--budget`` seconds in
proportion to its ``WEIGHT`` and, for each size the user did not set, walks down the size's
ladder (largest first, the sizes shrinking in turn) to the first combination whose estimated time
fits the share.  A size the user sets is never changed.  An instrument called directly (the
studies do) with a ``None`` size gets the top of its ladder, the full default.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["Size", "full", "user_sizes", "levels", "choose", "estimate", "PassTimer", "PROBES", "describe"]


@dataclass(frozen=True)
class Size:
    """A size option: ``name`` (the argparse dest), ``ladder`` (the full default first, then the
    smaller values the budget may choose) and ``inherit`` (an option whose user-given value it takes
    when it is not given itself)."""
    name: str
    ladder: Tuple[Any, ...]
    inherit: Optional[str] = None
    flag: str = ""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def user_sizes(args, sizes: Sequence[Size]) -> Dict[str, Any]:
    """The sizes the user set (directly or through ``inherit``)."""
    out = {}
    for s in sizes:
        v = getattr(args, s.name, None)
        if v is None and s.inherit:
            v = getattr(args, s.inherit, None)
        if v is not None:
            out[s.name] = v
    return out


def full(args, sizes: Sequence[Size]) -> argparse.Namespace:
    """A copy of ``args`` with every unset size at the top of its ladder (the full default)."""
    out = argparse.Namespace(**vars(args))
    for s in sizes:
        setattr(out, s.name, user_sizes(args, [s]).get(s.name, s.ladder[0]))
    return out


def levels(sizes: Sequence[Size], fixed: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Size combinations from the largest down: the free sizes step down their ladders in turn
    (round robin, in ``sizes`` order); fixed ones keep their value."""
    idx = {s.name: 0 for s in sizes}
    free = [s for s in sizes if s.name not in fixed]

    def current():
        return {s.name: fixed.get(s.name, s.ladder[idx[s.name]]) for s in sizes}
    yield current()
    turn = 0
    while any(idx[s.name] < len(s.ladder) - 1 for s in free):
        s = free[turn % len(free)]
        turn += 1
        if idx[s.name] < len(s.ladder) - 1:
            idx[s.name] += 1
            yield current()


def estimate(work: Dict[str, float], seconds: Dict[str, float]) -> float:
    """Seconds for ``work`` (units of each probe kind; ``"seconds"`` is time already in seconds)."""
    return sum(n * (1.0 if k == "seconds" else seconds[k]) for k, n in work.items())


def choose(sizes: Sequence[Size], fixed: Dict[str, Any], cost: Callable[[Dict[str, Any]], float],
           share: float) -> Tuple[Dict[str, Any], float, bool]:
    """(the first level from :func:`levels` whose ``cost`` fits ``share``, its cost, whether it fits);
    the smallest level when none fits."""
    last = None
    for lv in levels(sizes, fixed):
        t = cost(lv)
        if t <= share:
            return lv, t, True
        if math.isfinite(t) or last is None:  # an impossible level (infinite cost) is a last resort only
            last = (lv, t)
    return last[0], last[1], False


def describe(sizes: Sequence[Size], values: Dict[str, Any]) -> str:
    """``--opt value ...`` for the command line that reproduces ``values``."""
    def show(v):
        return ",".join(str(i) for i in v) if isinstance(v, (list, tuple)) else str(v)
    return " ".join(f"{s.option} {show(values[s.name])}" for s in sizes if s.name in values)


def _forward(model, x, y) -> int:
    with torch.no_grad():
        model(x)
    return len(x)


def _features(model, x, y) -> int:
    from vitlab.analysis.features import feature_statistics
    feature_statistics(model, x, batch_size=len(x), max_images=len(x))
    return len(x)


def _attention(model, x, y) -> int:
    from vitlab.analysis.attention import attention_statistics
    attention_statistics(model, x, batch_size=len(x), max_images=len(x))
    return len(x)


def _hvp(model, x, y) -> int:
    from vitlab.analysis.hessian import hessian_vector_product
    from vitlab.analysis.landscape import soft_cross_entropy
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    was = model.training
    model.eval()
    try:  # one image: a Hessian-vector product costs several forward passes
        hessian_vector_product(model, soft_cross_entropy, [(x[:1], y[:1])], torch.ones(n, dtype=torch.float64))
    finally:
        model.train(was)
    return 1


# kind -> one unit of work on a batch, returning how many images it took
PROBES: Dict[str, Callable] = {"forward": _forward, "features": _features, "attention": _attention, "hvp": _hvp}


class PassTimer:
    """Seconds per image of each probe kind, timed once on ``images`` (after a warm-up run on one
    image, except a Hessian-vector product) and cached per (kind, precision)."""

    def __init__(self, model, images: torch.Tensor, labels: torch.Tensor, fixed: Optional[Dict[str, float]] = None):
        self.model, self.x, self.y = model, images, labels
        self.cache: Dict[Tuple[str, str], float] = {}
        self.fixed = dict(fixed or {})  # kind -> seconds per image (tests, or known costs)
        self.spent = 0.0

    def seconds(self, kinds: Sequence[str], ctx: Callable[[], Any], precision: str) -> Dict[str, float]:
        out = {}
        for k in kinds:
            if k == "seconds":
                continue
            if k in self.fixed:
                out[k] = self.fixed[k]
                continue
            key = (k, "float32" if k == "hvp" else precision)
            if key not in self.cache:
                self.cache[key] = self._time(k, ctx if k != "hvp" else None)
            out[k] = self.cache[key]
        return out

    def _time(self, kind: str, ctx) -> float:
        import contextlib
        t_all = time.perf_counter()
        dt, n = math.inf, 1
        # warm up on one image, then time; a Hessian-vector product is timed cold (the forward probes
        # warmed the model up; one more costs as much as several forward passes)
        runs = [(self.x, self.y)] if kind == "hvp" else [(self.x[:1], self.y[:1]), (self.x, self.y)]
        for x, y in runs:
            with (ctx() if ctx else contextlib.nullcontext()):
                t0 = time.perf_counter()
                n = PROBES[kind](self.model, x, y)
                dt = time.perf_counter() - t0
        self.spent += time.perf_counter() - t_all
        return dt / n


def plan_instrument(module, args, data, timer: PassTimer, ctx, precision: str, share: float,
                    fixed: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Choose ``module``'s sizes that are not in ``fixed`` (default: those the user set in ``args``)
    for ``share`` seconds; returns what was chosen (for the report) and sets it on ``args``."""
    sizes: List[Size] = list(module.SIZES)
    fixed = user_sizes(args, sizes) if fixed is None else fixed
    probe = argparse.Namespace(**vars(args))

    def cost(values):
        for k, v in values.items():
            setattr(probe, k, v)
        work = module.work(probe, data)
        return estimate(work, timer.seconds(list(work), ctx, precision))
    chosen, secs, fits = choose(sizes, fixed, cost, share)
    for k, v in chosen.items():
        setattr(args, k, v)
    auto = [s.name for s in sizes if s.name not in fixed]
    return {"share_s": share, "estimate_s": secs, "fits": fits, "auto": auto,
            "sizes": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in chosen.items()},
            "options": describe(sizes, chosen)}
