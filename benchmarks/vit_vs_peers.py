"""ViT-S/16 at 224: vitlab beside timm and vit-pytorch, inference and training, in one run.

    python benchmarks/vit_vs_peers.py                 # CPU float32, batch 16, 5 timed steps each
    python benchmarks/vit_vs_peers.py --device cuda --amp bf16 --compile --train-only
    python benchmarks/vit_vs_peers.py --variant vit5  # ViT-5-S: vitlab's recipe vs vit-pytorch's vit_5.ViT

The three models have the same sizes (dim 384, depth 12, 6 heads, MLP 1536, 1000 classes);
their steps alternate (vitlab, timm, vit-pytorch, vitlab, ...) so that machine load affects all
alike.  Prints img/s, FLOP/s, the torch.mm roofline and the ratios vitlab / peer; writes the
'vit_vs_peers' section of benchmarks/RESULTS.md (``--no-write`` to skip).  ``--variant vit5``: ViT-5-S (the same
sizes, 4 registers; RMSNorm, RMS QK-norm, LayerScale, RoPE on patches and registers in both, other RoPE bases in
vit-pytorch's, which cost the same; timm has no ViT-5), section 'vit5_vs_peers'.
"""
from __future__ import annotations

import _common as C  # noqa: I001  (sets sys.path for an uninstalled checkout)

import timm
import torch

import vitlab
from vitlab.bench import MM_KEY, StepSpec, compare


def build(img_size: int = 224, variant: str = "vit"):
    if variant == "vit5":
        from vit_pytorch.vit_5 import ViT as ViT5

        return {"vitlab": vitlab.create_model("vit5_small", img_size=img_size),
                "vit-pytorch": ViT5(image_size=img_size, patch_size=16, num_classes=1000, dim=384, depth=12,
                                    heads=6, mlp_dim=1536, dim_head=64, num_registers=4)}
    models = {"vitlab": vitlab.create_model("vit_small_patch16_224", img_size=img_size),
              "timm": timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img_size)}
    try:
        from vit_pytorch import ViT
        models["vit-pytorch"] = ViT(image_size=img_size, patch_size=16, num_classes=1000, dim=384, depth=12,
                                    heads=6, mlp_dim=1536, dim_head=64)
    except ImportError:
        print("vit-pytorch not installed: skipping it")
    return models


def main() -> int:
    p = C.vit_args(__doc__.splitlines()[0])
    p.add_argument("--variant", choices=("vit", "vit5"), default="vit", help="ViT-S/16 (default) or ViT-5-S")
    args = p.parse_args()
    C.setup(args)
    started, load0 = C.now(), C.loadavg()
    print(f"load average: {load0}")
    sections = []
    summary = []
    modes = [m for m in ("infer", "train") if not ((m == "infer" and args.train_only) or
                                                  (m == "train" and args.infer_only))]
    for mode in modes:
        spec = StepSpec(batch_size=args.batch_size, input_size=(3, args.img_size, args.img_size),
                        train=mode == "train", device=args.device, amp=args.amp, compile=args.compile)
        torch.manual_seed(0)
        res = compare(build(args.img_size, args.variant), spec, runs=args.runs, warmup=args.warmup, mm_size=2048)
        mm_res = res.pop(MM_KEY)
        mm_run = mm_res.flops_per_s
        rows = [[k] + C.fmt_result(r, mm_run) for k, r in res.items()]
        ratios = [f"vitlab / {k}: **{res['vitlab'].img_per_s / r.img_per_s:.2f}x** ({C.paired(res['vitlab'], r)})"
                  for k, r in res.items() if k != "vitlab"]
        text = (f"### {'Inference' if mode == 'infer' else 'Training step (forward, backward, AdamW)'}\n\n"
                + C.table(["model"] + C.RESULT_HEADERS, rows)
                + f"\n\nThroughput ratios: {'; '.join(ratios)}.  \n"
                f"Roofline: torch.mm 2048x2048 timed in the same rounds: {mm_run / 1e9:.1f} GFLOP/s (median "
                f"{mm_res.median_s * 1e3:.0f} ms [{min(mm_res.times_s) * 1e3:.0f}-{max(mm_res.times_s) * 1e3:.0f}]); "
                f"vitlab achieves **{100 * res['vitlab'].flops_per_s / mm_run:.0f}%** of it.\n")
        print(text)
        sections.append(text)
        summary.append(f"{mode}: " + ", ".join(ratios))
    body = C.header(args, C.command_line(), started, load0) + "\n" + "\n".join(sections)
    if not args.no_write:
        suffix = C.suffix(args)
        name, peers = ("vit5_vs_peers", "ViT-5-S/16 at {}: vitlab vs vit-pytorch") if args.variant == "vit5" \
            else ("vit_vs_peers", "ViT-S/16 at {}: vitlab vs timm vs vit-pytorch")
        C.update_results(name + suffix, peers.format(args.img_size) + (f" ({suffix[1:]})" if suffix else ""), body)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
