"""Hierarchical backbones, vitlab vs timm's same models in one run: Swin-T and PVTv2-B0 (and more).

    python benchmarks/hierarchical.py              # inference, batch 16, float32
    python benchmarks/hierarchical.py --train

Swin: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al.,
ICCV 2021); PVTv2: "PVT v2: Improved Baselines with Pyramid Vision Transformer" (Wang et al.,
CVM 2022).  A pair is benchmarked only once the vitlab model is registered
(``vitlab.is_model``); the others are listed as not built yet.  Steps alternate vitlab/timm.
"""
from __future__ import annotations

import _common as C  # noqa: I001

PAIRS = {  # vitlab name -> timm name
    "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "pvt_v2_b0": "pvt_v2_b0",
}


def main() -> int:
    p = C.common_args(__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true")
    p.add_argument("--models", nargs="+", default=list(PAIRS), help=f"vitlab names (default: {' '.join(PAIRS)})")
    args = p.parse_args()
    C.setup(args)
    return C.vs_timm(args, {n: PAIRS.get(n, n) for n in args.models}, "hierarchical", "Hierarchical backbones vs timm")


if __name__ == "__main__":
    raise SystemExit(main())
