"""NaViT: a packed batch of mixed-size images vs padding every image to the largest, images per second.

    python benchmarks/navit_packing.py                 # navit_small_patch16, 32 images, inference
    python benchmarks/navit_packing.py --train

"Patch n' Pack: NaViT" (Dehghani et al., NeurIPS 2023) packs the patches of images of different sizes into
sequences with block-diagonal masks, instead of resizing or padding every image to one size.  The same model
and weights run both ways, steps alternating: *packed* (``model(list of images)``: first-fit packing into
``max_len``-token sequences, masked attention, one prediction per image) and *padded* (every image zero-padded
to the largest side, a plain ``(B, C, S, S)`` batch, no mask).  The image sizes are drawn once from a fixed seed.
"""
from __future__ import annotations

import statistics
import time

import _common as C  # noqa: I001

import torch
import torch.nn.functional as F

import vitlab


def _images(n: int, sides, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: sides[int(torch.randint(len(sides), (1,), generator=g))]  # noqa: E731
    return [torch.randn(3, pick(), pick(), generator=g) for _ in range(n)]


def _step(model, batch, train: bool):
    if train:
        out = model(batch)
        out.logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        return
    with torch.inference_mode():
        model(batch)


def main() -> int:
    p = C.common_args(__doc__.splitlines()[0], batch_size=32)
    p.add_argument("--train", action="store_true")
    p.add_argument("--model", default="navit_small_patch16")
    p.add_argument("--sides", default="64,96,128,160,224", help="image sides to draw from (default 64..224)")
    args = p.parse_args()
    C.setup(args)
    started, load0 = C.now(), C.loadavg()
    sides = [int(s) for s in args.sides.split(",")]
    images = _images(args.batch_size, sides)
    top = max(sides)
    padded = torch.stack([F.pad(im, (0, top - im.shape[2], 0, top - im.shape[1])) for im in images])
    model = vitlab.create_model(args.model).train(args.train)
    tokens_packed = sum((im.shape[1] // model.patch_size) * (im.shape[2] // model.patch_size) for im in images)
    tokens_padded = len(images) * (top // model.patch_size) ** 2
    runs = {"packed": (images, []), "padded": (padded, [])}
    for r in range(args.warmup + args.runs):
        for name, (batch, times) in runs.items():
            t0 = time.perf_counter()
            _step(model, batch, args.train)
            if r >= args.warmup:
                times.append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, (_, t) in runs.items()}
    rows = [[k, f"{len(images) / med[k]:.1f}", f"{med[k] * 1e3:.0f}", n]
            for k, n in (("packed", tokens_packed), ("padded", tokens_padded))]
    pairs = [tb / ta for ta, tb in zip(runs["packed"][1], runs["padded"][1])]
    ratio = (f"packed / padded **{med['padded'] / med['packed']:.2f}x** images/s (paired per round "
             f"{statistics.median(pairs):.2f}x); tokens {tokens_packed} packed vs {tokens_padded} padded")
    print(ratio)
    body = (C.header(args, C.command_line(), started, load0)
            + f"Model {args.model}, {len(images)} images with sides drawn from {sides} (seed 0).\n\n"
            + C.table(["input", "img/s", "ms/step (median)", "patch tokens"], rows) + f"\n\n{ratio}.\n")
    C.publish(args, "navit_packing" + ("_train" if args.train else ""),
              f"NaViT packing vs padding ({'training' if args.train else 'inference'})", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
