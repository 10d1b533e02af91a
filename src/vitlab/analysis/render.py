"""The HTML report of ``vitlab analyze``: an overview table, then each instrument's section
(``vitlab.analysis.instruments.<name>.report``), then the instruments that did not run."""
from __future__ import annotations

import os
from typing import Dict, Optional

from vitlab.analysis import instruments
from vitlab.analysis.instruments.common import ok

__all__ = ["render_report", "REPORT_ORDER"]

REPORT_ORDER = ("features", "attention", "lipschitz", "landscape", "hessian", "robustness", "calibration")


def _precision(r: Dict) -> str:
    """'bfloat16 autocast (float32: lipschitz, hessian)', 'float32', or '' for results written before --amp."""
    prec = r.get("precision") or {}
    kinds = {v.get("dtype") for v in prec.values()}
    if "bfloat16" not in kinds:
        return "float32" if prec else ""
    f32 = [k for k, v in prec.items() if v.get("dtype") == "float32"]
    return "bfloat16 autocast" + (f" (float32: {', '.join(f32)})" if f32 else "")


def _overview(runs: Dict[str, Dict]):
    from vitlab.analysis import report
    rows = []
    for lab, r in runs.items():
        m = r.get("meta", {})
        rows.append([lab, m.get("model"), m.get("parameters"), "yes" if m.get("trained") else "no", m.get("data"),
                     (ok(r, "calibration") or {}).get("metrics", {}).get("top1"), _precision(r),
                     sum(r.get("timings", {}).values())])
    frags = [report.table(["run", "model", "parameters", "trained", "data", "top-1 (%)", "precision",
                           "analysis time (s)"], rows)]
    for lab, r in runs.items():
        for n_ in r.get("meta", {}).get("data_notes", []):
            frags.append(report.note(f"{lab}: {n_}"))
    return "Overview", frags


def render_report(runs: Dict[str, Dict], out_dir: str, run_dirs: Optional[Dict[str, str]] = None,
                  title: str = "vitlab analyze") -> str:
    """Overlay plots of all ``runs`` (label -> analysis.json content) into ``out_dir`` and write
    ``report.html`` there."""
    from vitlab.analysis import report
    os.makedirs(out_dir, exist_ok=True)
    sections = [_overview(runs)]
    modules = instruments.by_key()
    for key in REPORT_ORDER:
        sections += modules[key].report(runs, out_dir, run_dirs or {})
    errs = [[lab, k, v.get("error") or v.get("skipped")] for lab, r in runs.items() for k, v in r.items()
            if isinstance(v, dict) and ("error" in v or "skipped" in v)]
    if errs:
        sections.append(("Instruments not run", [report.table(["run", "instrument", "reason"], errs)]))
    return report.write_html_report(os.path.join(out_dir, "report.html"), title, sections)
