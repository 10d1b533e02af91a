"""User-facing errors: imported by every layer of vitlab, importing nothing of it."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error the user caused (bad path, bad value): the command line prints it as one line,
    without a traceback."""
