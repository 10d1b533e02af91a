"""Helpers shared by the instrument modules of ``vitlab analyze``."""
from __future__ import annotations

import os
from typing import Dict, Optional

__all__ = ["progress", "has_contract", "num_classes", "ok", "successful"]


def progress(args) -> bool:
    return not args.no_progress


def has_contract(model) -> bool:
    return hasattr(model, "forward_halves")


def num_classes(model, data) -> int:
    return int(getattr(model, "num_classes", 0) or data.num_classes)


def ok(r: Dict, key: str) -> Optional[Dict]:
    """``r[key]`` when the instrument ran (no error, not skipped), else None."""
    v = r.get(key)
    return v if isinstance(v, dict) and "error" not in v and "skipped" not in v else None


def successful(runs: Dict[str, Dict], key: str) -> Dict[str, Dict]:
    """label -> result of every run in which instrument ``key`` ran."""
    return {lab: ok(r, key) for lab, r in runs.items() if ok(r, key)}


def figure_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name)
