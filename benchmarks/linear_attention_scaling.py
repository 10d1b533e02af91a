"""Focused linear attention vs softmax (SDPA) attention on one ViT block as the token count grows.

    python benchmarks/linear_attention_scaling.py          # N = 196, 784, 3136, 12544; dim 384, 6 heads

One pre-norm block (norm, mixer, MLP; vitlab's ``Block``) on a square token grid of side 14, 28,
56, 112 (no class token; contiguous ``(B, N, C)`` tokens, as inside a model), batch 1, inference.
Every (mixer, N) pair takes one step per round, in one run, so that a change in machine load
between N's cancels in the growth.  Prints time and peak step memory per N, the growth factor from
one N to the next (4x the tokens; ratio of medians and median of the per-round ratios), and the
ratio softmax / focused_linear.  Linear attention: "FLatten Transformer: Vision
Transformer using Focused Linear Attention" (Han et al., ICCV 2023).
"""
from __future__ import annotations

import _common as C  # noqa: I001

import torch
from torch import nn

from vitlab.bench import compare, StepSpec
from vitlab.models.vit import Block

MIXERS = ("softmax", "focused_linear")
MATH = "softmax (math, N x N in memory)"


class OneBlock(nn.Module):
    """A channels-last (B, H, W, C) map -> (B, H*W, C) tokens (a view, no copy) -> one Block ->
    tokens: lets ``vitlab.bench`` time a block on tokens laid out as inside a model."""

    def __init__(self, dim: int, heads: int, mixer: str, math: bool = False, pool: bool = False):
        super().__init__()
        self.block = Block(dim, heads, mixer=mixer)
        self.num_classes = dim
        self.math = math  # force the math SDPA backend: the N x N probabilities are materialised
        self.pool = pool  # training step: mean over tokens -> (B, C) "logits" for the loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, h, w, c = x.shape
        tokens = x.flatten(1, 2)
        if self.math:
            with sdpa_kernel(SDPBackend.MATH):
                out = self.block(tokens, (h, w), 0)
        else:
            out = self.block(tokens, (h, w), 0)
        return out.mean(1) if self.pool else out


def main() -> int:
    p = C.common_args(__doc__.splitlines()[0], batch_size=1, runs=5)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--sides", type=int, nargs="+", default=[14, 28, 56, 112], help="token grid sides (N = side^2)")
    p.add_argument("--train", action="store_true", help="time forward + backward + AdamW instead of inference")
    p.add_argument("--math-max-n", type=int, default=3136,
                   help="also run softmax on the math backend (N x N probabilities in memory) up to this N "
                        "(default 3136; N = 12544 needs about 8 GB)")
    args = p.parse_args()
    C.setup(args)
    started, load0 = C.now(), C.loadavg()
    print(f"load average: {load0}")
    # One alternating run over every (mixer, N): a round times each model once, so the growth from
    # one N to the next compares steps taken seconds apart, not in separate runs minutes apart.
    models, specs = {}, {}
    for side in args.sides:
        torch.manual_seed(0)
        for m in MIXERS + ((MATH,) if side * side <= args.math_max_n else ()):
            key = f"{m} N={side * side}"
            models[key] = OneBlock(args.dim, args.heads, "softmax" if m == MATH else m, math=m == MATH,
                                   pool=args.train)
            specs[key] = StepSpec(batch_size=args.batch_size, input_size=(side, side, args.dim), train=args.train,
                                  device=args.device, amp=args.amp, compile=args.compile)
    flat = compare(models, next(iter(specs.values())), runs=args.runs, warmup=args.warmup, specs=specs)
    res = {side: {m: flat[k] for m in MIXERS + (MATH,) if (k := f"{m} N={side * side}") in flat}
           for side in args.sides}
    for side in args.sides:
        print(f"N={side * side}: " + ", ".join(f"{m} {r.median_s * 1e3:.1f} ms, {C.format_bytes(r.peak_mem_bytes)}"
                                                for m, r in res[side].items()), flush=True)
    rows, prev = [], None
    for side in args.sides:
        r = res[side]
        row = [side * side]
        for m in MIXERS + (MATH,):
            if m not in r:
                row += ["not run (--math-max-n)"] * (2 if m == MATH else 3)
                continue
            g_t = f" (x{r[m].median_s / prev[m].median_s:.2f})" if prev and m in prev else ""
            g_m = f" (x{r[m].peak_mem_bytes / prev[m].peak_mem_bytes:.2f})" if prev and m in prev else ""
            row += [f"{r[m].median_s * 1e3:.1f}{g_t}", f"{C.format_bytes(r[m].peak_mem_bytes)}{g_m}"]
            if m != MATH:
                row.append(f"{r[m].flops_per_image / 1e9:.2f}")
        row.append(f"{r['softmax'].median_s / r['focused_linear'].median_s:.2f}x")
        rows.append(row)
        prev = r
    heads = (["N"] + [f"{m} {what}" for m in MIXERS for what in ("ms (growth)", "peak mem (growth)", "GFLOPs")]
             + [f"{MATH} {what}" for what in ("ms (growth)", "peak mem (growth)")])
    body = (C.header(args, C.command_line(), started, load0)
            + f"\nOne block (dim {args.dim}, {args.heads} heads, MLP 4x), {'training step' if args.train else 'inference'}"
            ", batch per row as in Settings. Growth = this row / previous row (4x the tokens).  "
            "Last column: softmax (SDPA) time / focused_linear time (>1: linear attention is faster).  "
            "`softmax` runs the fused SDPA kernel, which never stores the N x N matrix (its memory is linear, its "
            "time quadratic); the math-backend row shows the quadratic memory of explicit attention.  "
            "GFLOPs per forward of the block (FlopCounterMode).\n\n"
            + C.table(heads + ["softmax / linear"], rows) + "\n\n"
            + "Growth per round (median over the rounds of this step's time / the previous N's step time in "
              "the same round): " + "; ".join(
                f"{m} " + ", ".join(f"x{C.paired_growth(res[b][m], res[a][m]):.2f}"
                                    for a, b in zip(args.sides, args.sides[1:])) for m in MIXERS) + ".\n")
    C.publish(args, "linear_scaling" + ("_train" if args.train else ""),
              "Focused linear attention vs softmax SDPA: scaling in the token count"
              + (" (training step)" if args.train else ""), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
