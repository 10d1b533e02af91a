"""vitlab.runtime.tune_cpu_allocator: freed activation memory is reused, not faulted in again."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# Allocate three blocks, write them, free them; ten times.  With glibc's defaults, 24 MiB blocks freed
# at the heap top exceed the (dynamic, 2 x 24 MiB) trim threshold and go back to the system, and
# 40 MiB blocks (above the largest mmap threshold) are mapped and unmapped every time: either way the
# pages are faulted in again next round.  Tuned, they stay in the heap and are reused.
PROBE = r"""
import ctypes, importlib.util, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":  # vitlab/runtime.py alone (no torch import: fast, and only malloc matters)
    spec = importlib.util.spec_from_file_location("rt", sys.argv[2])
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    assert rt.tune_cpu_allocator(force=True)
n = int(sys.argv[3]) * 1024 * 1024
def rnd():
    ptrs = [libc.malloc(n) for _ in range(3)]
    for p in ptrs:
        ctypes.memset(p, 1, n)
    for p in ptrs:
        libc.free(p)
for _ in range(3):
    rnd()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    rnd()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode: str, mib: int = 24) -> int:
    import vitlab.runtime

    out = subprocess.run([sys.executable, "-c", PROBE, mode, vitlab.runtime.__file__, str(mib)], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mib", [24, 40])
def test_tuned_allocator_stops_page_faults_on_reallocation(mib):
    # Five runs of each, best and worst: robust to a heap placement that lets glibc keep the memory
    # even with its defaults, or costs the tuned run an extension.
    default = [_faults("default", mib) for _ in range(5)]
    tuned = [_faults("tuned", mib) for _ in range(5)]
    pages = 10 * 3 * mib * 1024 * 1024 // 4096  # what faulting every round in again would cost
    assert max(default) > pages // 2, (default, tuned)  # the probe does show the problem with the defaults
    assert min(tuned) < pages // 20, (default, tuned)
    assert sorted(tuned)[2] < sorted(default)[2], (default, tuned)  # and the medians agree


def test_switch_off_by_environment(monkeypatch):
    import vitlab.runtime as rt

    monkeypatch.setattr(rt, "_tuned", False)
    monkeypatch.setenv("VITLAB_TUNE_MALLOC", "0")
    assert rt.tune_cpu_allocator() is False
