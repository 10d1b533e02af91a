"""ViT-S/16 at 224 under bf16 autocast: vitlab bf16 vs timm bf16 vs both in float32, in one run.

    python benchmarks/bf16.py                 # CPU, batch 16, inference and training step
    python benchmarks/bf16.py --train-only --runs 7

The issue behind it (17): on a CPU with native bf16 (AVX-512 BF16 or AMX) bf16 autocast makes
timm's ViT-S/16 about 2x faster than float32, so `vitlab train` / `eval` / `analyze` / `bench`
use it by default there (``--amp auto``).  This script shows that vitlab's ViT gets the same
speed-up as timm's and is level with timm under bf16.  Four models alternate step by step
(vitlab bf16, timm bf16, vitlab float32, timm float32), so that machine load affects all alike;
bf16 rows run under ``torch.autocast("cpu", torch.bfloat16)`` (weights, AdamW state and the loss
stay float32, as in ``vitlab train --amp bf16``).  The roofline reference is a 2048 x 2048
``torch.mm`` in bf16, timed in the same rounds.  Writes the 'bf16' section of
benchmarks/RESULTS.md (``--no-write`` to skip).
"""
from __future__ import annotations

import _common as C  # noqa: I001  (sets sys.path for an uninstalled checkout)

import timm
import torch

import vitlab
from vitlab.bench import MM_KEY, StepSpec, compare

NAME = "vit_small_patch16_224"
KEYS = ("vitlab bf16", "timm bf16", "vitlab float32", "timm float32")


def build(img_size: int):
    """The four models; the two of each library are separate instances with the same weights."""
    torch.manual_seed(0)
    ours = vitlab.create_model(NAME, img_size=img_size)
    theirs = timm.create_model(NAME, pretrained=False, img_size=img_size)
    ours32, theirs32 = vitlab.create_model(NAME, img_size=img_size), timm.create_model(NAME, img_size=img_size)
    ours32.load_state_dict(ours.state_dict())
    theirs32.load_state_dict(theirs.state_dict())
    return dict(zip(KEYS, (ours, theirs, ours32, theirs32)))


def measure(args, train: bool):
    spec = StepSpec(batch_size=args.batch_size, input_size=(3, args.img_size, args.img_size), train=train,
                    device=args.device, amp="bf16")
    f32 = StepSpec(**{**vars(spec), "amp": "none"})
    torch.manual_seed(0)
    return compare(build(args.img_size), spec, runs=args.runs, warmup=args.warmup, mm_size=2048,
                   specs={k: f32 for k in KEYS if k.endswith("float32")})


def ratio(res, a: str, b: str) -> str:
    return f"{a} / {b}: **{res[a].img_per_s / res[b].img_per_s:.2f}x** ({C.paired(res[a], res[b])})"


def section(res, train: bool) -> str:
    mm = res.pop(MM_KEY)
    rows = [[k] + C.fmt_result(r, mm.flops_per_s) for k, r in res.items()]
    ratios = [ratio(res, "vitlab bf16", "timm bf16"), ratio(res, "vitlab bf16", "vitlab float32"),
              ratio(res, "timm bf16", "timm float32"), ratio(res, "vitlab float32", "timm float32")]
    return (f"### {'Training step (forward, backward, AdamW)' if train else 'Inference'}\n\n"
            + C.table(["model"] + C.RESULT_HEADERS, rows)
            + "\n\nThroughput ratios:\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n\n"
            f"Roofline: bf16 torch.mm 2048x2048 timed in the same rounds: {mm.flops_per_s / 1e9:.1f} GFLOP/s "
            f"(median {mm.median_s * 1e3:.0f} ms); 'of mm rate' is against it, for the float32 rows too.\n"), ratios


def main() -> int:
    args = C.vit_args(__doc__.splitlines()[0]).parse_args()
    if args.amp != "none":
        print(f"--amp {args.amp} ignored: this script runs bf16 and float32 side by side")
        args.amp = "none"
    C.setup(args)
    started, load0 = C.now(), C.loadavg()
    print(f"load average: {load0}")
    texts, summary = [], []
    for train in (False, True):
        if (train and args.infer_only) or (not train and args.train_only):
            continue
        text, ratios = section(measure(args, train), train)
        print(text, flush=True)
        texts.append(text)
        summary += [f"{'train' if train else 'infer'}: {r}" for r in ratios]
    args.amp = "bf16"  # for the header's settings line; the float32 rows are named as such
    body = (C.header(args, C.command_line(), started, load0).replace(", bf16,", ", bf16 and float32 models,")
            + "\n" + "\n".join(texts))
    if not args.no_write:
        dev = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
        C.update_results("bf16" + dev, f"bf16 autocast: vitlab vs timm, and vs float32 (ViT-S/16 at {args.img_size})",
                         body)
    print("\n".join(s.replace("**", "") for s in summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
