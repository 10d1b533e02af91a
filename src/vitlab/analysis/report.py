"""A self-contained HTML report (every PNG inlined as base64) and JSON helpers for
``vitlab analyze``."""
from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["to_jsonable", "write_json", "write_html_report"]


def to_jsonable(obj: Any) -> Any:
    """Tensors, tuples, numpy scalars and non-finite floats -> plain JSON values (NaN/inf -> None)."""
    try:
        import torch
        if torch.is_tensor(obj):
            return to_jsonable(obj.detach().cpu().tolist())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(obj: Any, path: str) -> str:
    """Write atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=1)
    os.replace(tmp, path)
    return path


def _img(path: str, caption: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:1.6em}table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
figure{display:inline-block;margin:0.5em}img{max-width:100%}figcaption{font-size:0.8em;color:#555}
.note{color:#666;font-size:0.85em}pre{background:#f7f7f7;padding:0.5em;font-size:0.8em;overflow:auto}"""


def write_html_report(path: str, title: str, sections: List[Tuple[str, List[str]]], meta: Optional[Dict] = None) -> str:
    """``sections``: (heading, [html fragments]); fragments are produced with :func:`figure`,
    :func:`table` or plain escaped text.  Writes one self-contained page."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if meta:
        parts.append(_table(["key", "value"], [[k, v if not isinstance(v, (dict, list)) else json.dumps(to_jsonable(v))]
                                               for k, v in meta.items()]))
    for heading, frags in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(frags)
    parts.append("</body></html>")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, path)
    return path


figure = _img
table = _table


def note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"
