"""Atomic, resumable checkpoints.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``
(no arbitrary unpickling): model, optimizer, scheduler, grad scaler and EMA state dicts, the
RNG states of torch / numpy / python, the position (epoch and optimizer step within it), the
resolved config and the metric history.  Writes go to a temporary file that is then
``os.replace``-d over the target, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["atomic_save", "load_checkpoint", "capture_rng", "restore_rng", "find_resume_checkpoint",
           "resume_checkpoint", "resume_for_run", "run_dir_checkpoint", "run_dir_of"]


def atomic_save(obj: Any, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A vitlab training checkpoint, read without unpickling code (``weights_only=True``)."""
    from vitlab.errors import UserError
    from vitlab.interop.checkpoint import safe_torch_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "model" not in obj:
        raise UserError(f"{path} is not a vitlab checkpoint (no 'model' entry)")
    return obj


def capture_rng() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume_checkpoint(run_dir: str) -> Optional[str]:
    """The newest checkpoint in ``run_dir/checkpoints`` (``last.pt`` is rewritten at every save)."""
    cands = [p for p in glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")) if not os.path.basename(p).startswith(".")]
    cands = [p for p in cands if not os.path.basename(p).startswith("best")]
    return max(cands, key=os.path.getmtime) if cands else None


def run_dir_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint a run directory stands for: ``checkpoints/best.pt``, else ``checkpoints/last.pt``."""
    for name in ("best.pt", "last.pt"):
        path = os.path.join(run_dir, "checkpoints", name)
        if os.path.isfile(path):
            return path
    return None


def run_dir_of(checkpoint: str) -> str:
    """The run directory holding ``RUN_DIR/checkpoints/<checkpoint>``."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def resume_checkpoint(resume: Optional[str], out: Optional[str]) -> Optional[str]:
    """What ``--resume`` names on the command line: ``auto``: the newest checkpoint of ``--out`` (None if
    it has none yet), else the path itself."""
    from vitlab.errors import UserError

    if not resume:
        return None
    if resume != "auto":
        return resume
    if not out:
        raise UserError("--resume auto needs --out RUN_DIR (the run to continue)")
    return find_resume_checkpoint(out)


def resume_for_run(resume: Optional[str], run_dir: str, is_main: bool, log) -> Optional[str]:
    """The checkpoint a run in ``run_dir`` continues from (see :func:`resume_checkpoint`; ``auto`` with
    nothing there starts from scratch, said once); without ``--resume`` a ``run_dir`` that already holds a
    run is refused, so that nothing in it is overwritten."""
    from vitlab.errors import UserError

    if resume:
        path = resume_checkpoint(resume, run_dir)
        if path is None and is_main:
            log(f"--resume auto: no checkpoint in {os.path.join(run_dir, 'checkpoints')}, starting from scratch")
        return path
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
        raise UserError(f"--out {run_dir} already holds a run (checkpoints/last.pt); continue it with --resume auto "
                        f"or choose another --out (nothing was changed)")
    return None
