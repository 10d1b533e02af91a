"""Every token mixer on the same ViT-S/16 at 224: cost relative to softmax attention, in one run.

    python benchmarks/mixers.py              # inference, batch 16, float32
    python benchmarks/mixers.py --train      # training step (forward, backward, AdamW)

Mixers: softmax (SDPA), cosine (LipsFormer, Qi et al., ICLR 2023), attnscale (Wang et al.,
ICLR 2022), focused_linear (FLatten, Han et al., ICCV 2023); everything else is ViT-S/16.  Steps
alternate between the mixers.  Prints and records time / softmax time for each mixer.
"""
from __future__ import annotations

import _common as C  # noqa: I001

import torch

import vitlab
from vitlab.bench import MM_KEY, StepSpec, compare
from vitlab.layers.mixers import MIXERS


def main() -> int:
    p = C.common_args(__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--train", action="store_true")
    p.add_argument("--mixers", nargs="+", default=None, help="default: every registered mixer, softmax first")
    args = p.parse_args()
    C.setup(args)
    mixers = list(args.mixers or MIXERS.names())
    for m in mixers:
        MIXERS.get(m)  # unknown name: a clear error with close matches
    if "softmax" in mixers:
        mixers.remove("softmax")
    mixers = ["softmax"] + mixers
    started, load0 = C.now(), C.loadavg()
    print(f"load average: {load0}; mixers: {', '.join(mixers)}")
    spec = StepSpec(batch_size=args.batch_size, input_size=(3, args.img_size, args.img_size), train=args.train,
                    device=args.device, amp=args.amp, compile=args.compile)
    torch.manual_seed(0)
    models = {m: vitlab.create_model(args.model, mixer=m, img_size=args.img_size) for m in mixers}
    res = compare(models, spec, runs=args.runs, warmup=args.warmup, mm_size=2048)
    mm = res.pop(MM_KEY).flops_per_s
    base = res["softmax"].median_s
    rows = [[m] + C.fmt_result(r, mm) + [f"**{r.median_s / base:.2f}x**",
                                         C.paired(res["softmax"], r).replace("faster", "softmax faster")]
            for m, r in res.items()]
    body = (C.header(args, C.command_line(), started, load0)
            + f"\n`{args.model}` at {args.img_size} with each mixer, "
            f"{'training step' if args.train else 'inference'}; last column: time / softmax time "
            f"(target: at most 1.30x).  torch.mm 2048 rate in the same rounds: {mm / 1e9:.1f} GFLOP/s.\n\n"
            + C.table(["mixer"] + C.RESULT_HEADERS + ["time / softmax", "time / softmax, paired"], rows) + "\n")
    C.publish(args, "mixers" + ("_train" if args.train else ""),
              f"Token mixers on ViT-S/16 ({'training' if args.train else 'inference'})", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
