"""Run every CPU benchmark in turn (about 20 minutes on 2 busy cores) and refresh RESULTS.md.

    python benchmarks/run_all.py [extra args passed to every script, e.g. --runs 7]
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["vit_vs_peers.py", "bf16.py", "mixers.py", "linear_attention_scaling.py", "hierarchical.py",
           "catalogue.py", "navit_packing.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        if subprocess.call([sys.executable, str(HERE / script), *sys.argv[1:]]) != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
