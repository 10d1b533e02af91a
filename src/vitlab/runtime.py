"""Process-level settings that make PyTorch on the CPU faster: the C allocator and the intra-op threads.

PyTorch's CPU tensors come from the C library's ``malloc``.  glibc serves large requests
(above its mmap threshold, 128 KiB at first, rising to at most 32 MiB) with fresh ``mmap``
pages, and gives the top of its heap back to the system whenever more than the trim
threshold is free there.  A ViT step allocates and frees activations of tens of MiB
again and again, so the kernel has to fault in and zero the same amount of memory on every
step: about 10 % of a ViT-S training step on a 2-core machine.  :func:`tune_cpu_allocator`
turns ``mmap`` off (every block then comes from the heap) and stops heap trimming, so that
freed activation memory is reused instead of returned and faulted in again (the same effect
as the ``jemalloc`` / ``tcmalloc`` preload that PyTorch's CPU performance guides recommend,
without a preload).  Memory the process has freed then stays mapped to it until it exits.

``vitlab train | eval | analyze | bench`` call it first; set ``VITLAB_TUNE_MALLOC=0`` to keep
the C library's defaults.  It does nothing (and returns ``False``) where the C library is not
glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_cpu_allocator", "set_threads", "TRIM_THRESHOLD"]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: 2 GiB - 1, i.e. never trim in practice

_tuned = False


def tune_cpu_allocator(force: bool = False) -> bool:
    """Set glibc's mmap count limit to 0 (no ``mmap`` for any block; its mmap threshold then no
    longer matters) and its trim threshold to 2 GiB (see the module docstring).  Returns ``True``
    when both settings were taken, ``False`` when skipped (``VITLAB_TUNE_MALLOC=0`` unless
    ``force``, or not glibc).  Idempotent."""
    global _tuned
    if _tuned:
        return True
    if not force and os.environ.get("VITLAB_TUNE_MALLOC", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


def set_threads(threads=None, workers: int = 0) -> None:
    """``torch.set_num_threads(threads)`` if given; else, with DataLoader ``workers`` and no
    ``OMP_NUM_THREADS``, leave the cores the workers use (``vitlab train`` and ``vitlab pretrain``)."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    elif workers and torch.get_num_threads() > 1 and "OMP_NUM_THREADS" not in os.environ:
        # oversubscribed intra-op threads spin: 10-25x slower on the 2-core machine than one thread
        torch.set_num_threads(max(1, torch.get_num_threads() - int(workers)))
