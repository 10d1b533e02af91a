"""Matplotlib for the figures of the trainer and the analysis tools: headless and imported lazily."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (unless a backend was already chosen)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 110) -> Union[str, Path]:
    """Lay out, write and close ``fig``; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
