"""Progress and per-step logs.

* On a terminal: a tqdm bar per epoch.  Elsewhere (a log file, a pipe, CI): one plain line every
  ``--log-interval`` steps, never carriage-return frames.
* ``steps.jsonl`` in the run directory: one record (step, epoch, loss, lr, images/s) every
  ``--log-interval`` optimizer steps.
* ``--tensorboard``: the same scalars and the epoch metrics as TensorBoard event files
  (``torch.utils.tensorboard``; needs the ``tensorboard`` package).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional

__all__ = ["Progress", "StepLog"]


class Progress:
    """An epoch's progress on stderr: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, interval: int, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.n, self.desc = enabled, total, initial, desc
        self.interval = max(1, int(interval or 1))
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, leave=False,
                            dynamic_ncols=True)

    def update(self, loss: float, lr: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        elif self.enabled and (self.n % self.interval == 0 or self.n == self.total):
            print(f"{self.desc} step {self.n}/{self.total} loss {loss:.4f} lr {lr:.3e}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepLog:
    """``steps.jsonl`` every ``interval`` steps (rank 0 only) and optional TensorBoard scalars."""

    def __init__(self, run_dir: Optional[str], interval: int, tensorboard: bool = False, start_step: int = 0):
        self.interval = int(interval or 0)
        self.path = os.path.join(run_dir, "steps.jsonl") if run_dir and self.interval > 0 else None
        if self.path and os.path.isfile(self.path):  # a resumed run: drop the steps after its checkpoint
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.t0, self.images = time.time(), 0
        self.tb = None
        if run_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from vitlab.errors import UserError

                raise UserError("--tensorboard needs the 'tensorboard' package: pip install tensorboard") from None
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def step(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        self.images += images
        if self.interval <= 0 or step % self.interval:
            return
        dt = max(time.time() - self.t0, 1e-9)
        rec: Dict[str, Any] = dict(step=step, epoch=epoch, loss=loss, lr=lr, images_per_second=self.images / dt)
        self.t0, self.images = time.time(), 0
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "images_per_second"):
                self.tb.add_scalar(f"train/{k}", rec[k], step)

    def epoch(self, record: Dict[str, Any]) -> None:
        if self.tb is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step") and v == v:
                self.tb.add_scalar(f"epoch/{k}", v, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
