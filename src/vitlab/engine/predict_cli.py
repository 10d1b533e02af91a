"""``vitlab predict --checkpoint C PATH...``: top-k classes of images (files or folders), with
their names and probabilities, as CSV (default, to stdout or ``--out x.csv``) or JSON
(``--out x.json`` or ``--format json``)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any, Dict, List

__all__ = ["add_arguments", "run", "predict_files"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="a vitlab checkpoint, run directory or model directory")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", help="output file (.csv or .json; default: CSV on stdout)")
    p.add_argument("--format", choices=["csv", "json"], help="output format (default: from --out, else csv)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"], help="autocast (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")


def predict_files(checkpoint: str, paths: List[str], topk: int = 5, batch_size: int = 64, ema: bool = False,
                  amp: str = "auto", device: str = "auto") -> List[Dict[str, Any]]:
    """One record per image: ``path`` and ``top`` = [(class index, class name, probability), ...]."""
    import torch

    from vitlab.data.datasets import _pil_loader
    from vitlab.engine.amp import autocast, resolve_amp
    from vitlab.engine.distributed import resolve_device
    from vitlab.engine.inference import collect_images, load_for_inference
    from vitlab.errors import UserError

    if topk < 1:
        raise UserError(f"--topk must be >= 1, got {topk}")
    im = load_for_inference(checkpoint, ema)
    dev = resolve_device(device)
    model, tf, files = im.model.to(dev), im.transform(), collect_images(paths)
    k, amp = min(topk, len(im.classes)), resolve_amp(amp, dev, im.model)
    out: List[Dict[str, Any]] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        x = torch.stack([tf(_pil_loader(f)) for f in chunk]).to(dev)
        with torch.no_grad(), autocast(amp, dev):
            probs = model(x).float().softmax(-1).cpu()
        top_p, top_i = probs.topk(k, dim=-1)
        for f, ps, ids in zip(chunk, top_p.tolist(), top_i.tolist()):
            out.append({"path": f, "top": [(c, im.classes[c], p) for c, p in zip(ids, ps)]})
    return out


def _write(records: List[Dict[str, Any]], fmt: str, stream) -> None:
    if fmt == "json":
        json.dump([{"path": r["path"], "top": [{"class": c, "name": n, "prob": p} for c, n, p in r["top"]]}
                   for r in records], stream, indent=2)
        stream.write("\n")
        return
    w = csv.writer(stream)
    w.writerow(["path", "rank", "class", "name", "prob"])
    for r in records:
        for rank, (c, n, p) in enumerate(r["top"], 1):
            w.writerow([r["path"], rank, c, n, f"{p:.6f}"])


def run(args: argparse.Namespace) -> int:
    recs = predict_files(args.checkpoint, args.paths, args.topk, args.batch_size, args.ema, args.amp, args.device)
    fmt = args.format or ("json" if args.out and args.out.endswith(".json") else "csv")
    if not args.out:
        _write(recs, fmt, sys.stdout)
        return 0
    buf = io.StringIO()
    _write(recs, fmt, buf)
    tmp = args.out + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, args.out)
    print(f"wrote predictions for {len(recs)} images to {args.out}", file=sys.stderr)
    return 0
