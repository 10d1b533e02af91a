"""``vitlab study NAME``: train the models a paper's claim compares, measure them with the analysis
instruments and write ``report.html``, ``study.json``, the figures and the verdict table.

    vitlab study --list
    vitlab study anti_oversmoothing --out runs/study_aos
    vitlab study focused_linear --quick --out /tmp/fl
"""
from __future__ import annotations

import argparse
import os
import time

from vitlab.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="the study (see --list)")
    p.add_argument("--list", action="store_true", help="name the studies and their cost, then exit")
    p.add_argument("--data", default=None,
                   help="an ImageFolder root with train/ and val/ (a seeded class-balanced subset is used) or "
                        "'digits'; default: CIFAR-10 in ../shared/data/cifar10 ($VITLAB_STUDY_DATA overrides)")
    p.add_argument("--epochs", default=None, help="training epochs of every model (default: the study's budget)")
    p.add_argument("--seed", default="0", help="seed of the data subset, the initialisation and the data order")
    p.add_argument("--out", default=None, help="output folder (default runs/study_NAME)")
    p.add_argument("--quick", action="store_true", help="the plumbing only: tiny models, data and budgets (< 1 min)")


def _int(flag: str, text, minimum: int) -> int:
    try:
        v = int(str(text))
    except ValueError:
        v = None
    if v is None or v < minimum:
        raise UserError(f"{flag} {text!r}: expected an integer >= {minimum}")
    return v


def _list() -> int:
    from vitlab.studies import study_table

    rows = study_table()
    w = max(len(r[0]) for r in rows)
    for name, what, cost in rows:
        print(f"{name:<{w}}  {what}\n{'':<{w}}  cost: {cost}")
    return 0


def run(args) -> int:
    if args.list:
        return _list()
    if not args.name:
        raise UserError("name a study (vitlab study NAME) or pass --list")
    from vitlab.studies import get_study
    from vitlab.studies.common import Context, default_data
    from vitlab.studies.report import holds_text, write_outputs

    study = get_study(args.name)
    epochs = None if args.epochs is None else _int("--epochs", args.epochs, 1)
    seed = _int("--seed", args.seed, 0)
    out = args.out or os.path.join("runs", f"study_{study.NAME}")
    ctx = Context(study.NAME, out, args.data or default_data(), seed=seed, epochs=epochs, quick=args.quick)
    os.makedirs(ctx.work, exist_ok=True)
    with open(os.path.join(ctx.work, ".gitignore"), "w") as f:
        f.write("# training runs and the data subset of the study: not part of its report\n*\n")
    t0 = time.time()
    result = study.run(ctx)
    result["wall_seconds"] = time.time() - t0
    paths = write_outputs(ctx, study, result)
    for r in result["verdicts"]:
        print(f"{holds_text(r['holds']):>4}  {r['claim']}  [{r['measure']}]")
    print(f"report: {paths['html']} ({result['wall_seconds']:.0f} s)")
    return 0
