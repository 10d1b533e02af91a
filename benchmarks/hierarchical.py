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

import timm
import torch

import vitlab
from vitlab.bench import MM_KEY, StepSpec, compare

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
    started, load0 = C.now(), C.loadavg()
    print(f"load average: {load0}")
    rows, missing, ratios = [], [], []
    mm = None
    for name in args.models:
        timm_name = PAIRS.get(name, name)
        if not vitlab.is_model(name):
            missing.append(name)
            print(f"{name}: not registered in vitlab yet, skipped")
            continue
        torch.manual_seed(0)
        models = {f"vitlab {name}": vitlab.create_model(name), f"timm {timm_name}": timm.create_model(timm_name)}
        size = tuple(models[f"vitlab {name}"].default_cfg["input_size"])
        spec = StepSpec(batch_size=args.batch_size, input_size=size, train=args.train, device=args.device,
                        amp=args.amp, compile=args.compile)
        res = compare(models, spec, runs=args.runs, warmup=args.warmup, mm_size=2048)
        mm = res.pop(MM_KEY).flops_per_s
        rows += [[k] + C.fmt_result(r, mm) for k, r in res.items()]
        a, b = res.values()
        ratios.append(f"{name}: vitlab / timm **{a.img_per_s / b.img_per_s:.2f}x** ({C.paired(a, b)}) "
                      f"(torch.mm rate in these rounds {mm / 1e9:.1f} GFLOP/s)")
        print(ratios[-1], flush=True)
    body = C.header(args, C.command_line(), started, load0) + "\n"
    if rows:
        body += C.table(["model"] + C.RESULT_HEADERS, rows) + "\n\nRatios: " + "; ".join(ratios) + ".\n"
    if missing:
        body += f"\nNot run: {', '.join(missing)} (not registered in vitlab when this ran).\n"
    C.publish(args, "hierarchical" + ("_train" if args.train else ""),
              f"Hierarchical backbones vs timm ({'training' if args.train else 'inference'})", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
