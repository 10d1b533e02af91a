"""``vitlab study``: each seed paper's headline claim reproduced in miniature.

A study trains the models it compares with the engine (same data, budget, seed and recipe except
the part under study), measures them with the analysis instruments and writes ``study.json``
(every number), PNG figures, a verdict table (claim | measure | value per model | holds at this
scale?) and a self-contained ``report.html``.  One module per study; :mod:`.common` (data subset,
training, loading) and :mod:`.report` (verdicts, figures, outputs) are shared.  Nothing in vitlab
imports this package except the command line.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List, Tuple

from vitlab.errors import UserError

__all__ = ["STUDIES", "UNAVAILABLE", "get_study", "study_table"]

# name -> module (each offers NAME, TITLE, PAPER, COST, run(ctx) and verdicts(numbers))
STUDIES: Dict[str, str] = {
    "anti_oversmoothing": "vitlab.studies.anti_oversmoothing",
    "lipsformer_no_warmup": "vitlab.studies.lipsformer_no_warmup",
    "focused_linear": "vitlab.studies.focused_linear",
    "msa_vs_conv": "vitlab.studies.msa_vs_conv",
    "small_data": "vitlab.studies.small_data",
}
# named in the issue, not buildable yet: name -> reason
UNAVAILABLE: Dict[str, str] = {}


def get_study(name: str) -> ModuleType:
    if name in UNAVAILABLE:
        raise UserError(f"study {name!r} is {UNAVAILABLE[name]}")
    if name not in STUDIES:
        import difflib

        close = difflib.get_close_matches(name, list(STUDIES) + list(UNAVAILABLE), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown study {name!r}{hint}; expected one of: {', '.join(STUDIES)} (see vitlab study --list)")
    return importlib.import_module(STUDIES[name])


def study_table() -> List[Tuple[str, str, str]]:
    """(name, what it checks, cost) for every study, the unavailable ones last."""
    rows = []
    for name in STUDIES:
        m = get_study(name)
        rows.append((name, f"{m.TITLE} ({m.PAPER})", m.COST))
    rows += [(name, reason, "-") for name, reason in UNAVAILABLE.items()]
    return rows
