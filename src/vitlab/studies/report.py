"""Verdicts and outputs of a study: the verdict rules (a claim compared on numbers fixed before the
run), the verdict table as a PNG, ``study.json`` and the self-contained ``report.html``."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from vitlab.plotting import pyplot, save_figure
from vitlab.studies.common import finite

__all__ = ["verdict", "better", "not_worse", "all_hold", "accuracy_tolerance", "holds_text", "plot_verdict_table",
           "write_outputs", "markdown_verdicts", "plot_curves", "VERDICT_PNG"]

VERDICT_PNG = "verdict_table.png"


def verdict(claim: str, measure: str, values: Dict[str, Any], holds: Optional[bool], rule: str) -> Dict[str, Any]:
    """One row of the verdict table; ``holds`` None means the measure could not be taken."""
    shown = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
    return {"claim": claim, "measure": measure, "values": shown, "holds": holds, "rule": rule}


def holds_text(holds: Optional[bool]) -> str:
    return "n/a" if holds is None else ("yes" if holds else "no")


def better(values: Dict[str, Any], test: str, ref: str, higher: bool = True, margin: float = 0.0) -> Optional[bool]:
    """``values[test]`` beats ``values[ref]`` by more than ``margin`` (higher or lower is better);
    None when either is missing or not finite."""
    a, b = values.get(test), values.get(ref)
    if not (finite(a) and finite(b)):
        return None
    return (a - b > margin) if higher else (b - a > margin)


def not_worse(values: Dict[str, Any], test: str, ref: str, tolerance: float, higher: bool = True) -> Optional[bool]:
    """``values[test]`` is no worse than ``values[ref]`` by more than ``tolerance``."""
    a, b = values.get(test), values.get(ref)
    if not (finite(a) and finite(b)):
        return None
    return (a >= b - tolerance) if higher else (a <= b + tolerance)


def all_hold(results: Iterable[Optional[bool]]) -> Optional[bool]:
    """True when every part holds, False when one fails, None when none could be decided."""
    rs = list(results)
    if any(r is False for r in rs):
        return False
    return None if any(r is None for r in rs) else True


def accuracy_tolerance(top1: Optional[float], n: int) -> float:
    """Two binomial standard errors of a top-1 accuracy (percent) measured on ``n`` images: the
    difference below which two accuracies are not told apart."""
    p = (top1 if finite(top1) else 50.0) / 100.0
    p = min(max(p, 0.05), 0.95)
    return 200.0 * math.sqrt(p * (1 - p) / max(n, 1))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.3e}"
    return str(v)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def plot_verdict_table(rows: Sequence[Dict[str, Any]], models: Sequence[str], path: str, title: str = "") -> str:
    """The verdict table as a figure: claim | measure | one column per model | holds at this scale?"""
    plt = pyplot()
    header = ["claim", "measure"] + list(models) + ["holds at this scale?"]
    cells = [[_wrap(r["claim"], 38), _wrap(r["measure"], 30)] + [_fmt(r["values"].get(m)) for m in models]
             + [holds_text(r["holds"])] for r in rows]
    lines = [max(c.count("\n") + 1 for c in row) for row in cells]
    head_lines = max(h.count("\n") + 1 for h in [_wrap(h, 14) for h in header])
    fig_h = 0.5 + 0.2 * (sum(lines) + head_lines + 0.4 * (len(cells) + 1))
    fig, ax = plt.subplots(figsize=(4.8 + 1.15 * len(models) + 2.6, fig_h))
    ax.axis("off")
    widths = [0.30, 0.24] + [0.34 / max(len(models), 1)] * len(models) + [0.12]
    tab = ax.table(cellText=cells, colLabels=[_wrap(h, 14) for h in header], colWidths=widths, loc="upper center",
                   cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7.5)
    unit = 0.97 / (sum(lines) + head_lines + 0.4 * (len(cells) + 1))
    for (i, j), cell in tab.get_celld().items():
        n = head_lines if i == 0 else lines[i - 1]
        cell.set_height(unit * (n + 0.4))
        if i == 0:
            cell.set_facecolor("#eeeeee")
        elif j == len(header) - 1:
            cell.set_facecolor({"yes": "#d8f0d8", "no": "#f6d5d5"}.get(cells[i - 1][-1], "#f0f0f0"))
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _html_sections(result: Dict[str, Any], out: str) -> List:
    from vitlab.analysis import report as html

    models = result["models_order"]
    rows = [[r["claim"], r["measure"]] + [r["values"].get(m) for m in models] + [holds_text(r["holds"]), r["rule"]]
            for r in result["verdicts"]]
    sections = [("Verdicts", [html.figure(os.path.join(out, VERDICT_PNG), "verdict table"),
                              html.table(["claim", "measure"] + list(models) + ["holds?", "rule"], rows)])]
    figs = [html.figure(os.path.join(out, f), cap) for f, cap in result["figures"] if f != VERDICT_PNG]
    sections.append(("Figures", figs))
    per_model = [[m] + [result["numbers"].get(m, {}).get(k) for k in result["number_keys"]] for m in models]
    sections.append(("Numbers per model", [html.table(["model"] + list(result["number_keys"]), per_model)]))
    sections.append(("Notes", [html.note(n) for n in result.get("notes", [])]))
    return sections


def markdown_verdicts(result: Dict[str, Any]) -> str:
    """The verdict table in Markdown (for the study's page)."""
    models = result["models_order"]
    lines = ["| claim | measure | " + " | ".join(models) + " | holds at this scale? |",
             "|---|---|" + "---|" * len(models) + "---|"]
    for r in result["verdicts"]:
        cells = [r["claim"], r["measure"]] + [_fmt(r["values"].get(m)) for m in models] + [
            f"**{holds_text(r['holds'])}** ({r['rule']})"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(ctx, study, result: Dict[str, Any]) -> Dict[str, str]:
    """``study.json``, the verdict table PNG and ``report.html`` in ``ctx.out``."""
    from vitlab.analysis import report as html

    os.makedirs(ctx.out, exist_ok=True)
    models = result["models_order"]
    plot_verdict_table(result["verdicts"], models, os.path.join(ctx.out, VERDICT_PNG),
                       title=f"{study.NAME}: {study.PAPER}")
    result["figures"] = list(result["figures"]) + [(VERDICT_PNG, "verdict table")]
    meta = {"study": study.NAME, "paper": study.PAPER, "title": study.TITLE, "quick": ctx.quick, "seed": ctx.seed,
            **{f"data {k}": v for k, v in result.get("data", {}).items() if k in ("source", "train_images",
                                                                                    "val_images")}}
    json_path = html.write_json({"meta": meta, **{k: v for k, v in result.items()}},
                                os.path.join(ctx.out, "study.json"))
    with open(os.path.join(ctx.out, "verdicts.md"), "w") as f:
        f.write(markdown_verdicts(result))
    page = html.write_html_report(os.path.join(ctx.out, "report.html"), f"vitlab study {study.NAME}",
                                  _html_sections(result, ctx.out), meta=dict(meta, settings=result.get("settings")))
    return {"json": json_path, "html": page}


def plot_curves(panels: Sequence[Dict[str, Any]], path: str, xlabel: str = "block", title: str = "") -> str:
    """Side-by-side panels of per-model curves: each panel ``{"title", "ylabel", "curves": {model:
    [values]}, "log": bool, "x": optional [x values]}``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for lab, ys in panel["curves"].items():
            if not ys:
                continue
            xs = panel.get("x") or list(range(1, len(ys) + 1))
            pts = [(x, y) for x, y in zip(xs, ys) if finite(y)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, label=lab)
        if panel.get("log"):
            ax.set_yscale("log")
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel.get("xlabel", xlabel))
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
