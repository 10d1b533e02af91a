"""``vitlab export --checkpoint C --format onnx|exported``: the model for deployment.

* ``onnx``: ``torch.onnx.export`` (opset 18, a dynamic batch dimension), then checked: the file
  is run with onnxruntime on a random batch and its logits must match PyTorch's (max abs
  difference < ``--atol``, default 1e-4), else the export fails and the file is removed;
* ``exported``: ``torch.export`` saved as a ``.pt2`` program (``torch.export.load`` reads it).
Both export the model in eval mode, float32, with the preprocessing recorded next to it
(``<out>.json``: image size, channels, mean, std, crop_pct, class names).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_arguments", "run", "export_model"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a vitlab checkpoint, run directory or model directory")
    p.add_argument("--format", default="onnx", choices=["onnx", "exported"], help="onnx (default) or exported (.pt2)")
    p.add_argument("--out", help="output file (default: next to the checkpoint, model.onnx / model.pt2)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a training checkpoint")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |onnxruntime - PyTorch| logit difference")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime check")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")


def _check_onnx(path: str, model, x, atol: float) -> float:
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    err = float(np.abs(got - want).max())
    if not err < atol:
        from vitlab.errors import UserError

        os.remove(path)
        raise UserError(f"ONNX export of {path} differs from PyTorch by {err:.2e} (> --atol {atol:g}); file removed")
    return err


def _onnx(model, x, out: str, opset: int) -> None:
    import torch

    from vitlab.errors import UserError

    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the 'onnx', 'onnxscript' and 'onnxruntime' packages: "
                        "pip install onnx onnxscript onnxruntime") from None
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                             output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    prog.save(out + ".tmp")
    os.replace(out + ".tmp", out)


def export_model(checkpoint: str, fmt: str = "onnx", out=None, ema: bool = False, opset: int = 18,
                 atol: float = 1e-4, check: bool = True):
    """Export; returns ``(path, max abs difference to PyTorch or None)``."""
    import torch

    from vitlab.engine.inference import load_for_inference, model_input

    im = load_for_inference(checkpoint, ema)
    model = im.model.float().eval()
    base = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    if os.path.basename(base) == "checkpoints":
        base = os.path.dirname(base)
    out = out or os.path.join(base, "model.onnx" if fmt == "onnx" else "model.pt2")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    x = model_input(im, batch=2)
    err = None
    if fmt == "onnx":
        _onnx(model, x, out, opset)
        if check:
            err = _check_onnx(out, model, model_input(im, batch=3), atol)
    else:
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        torch.export.save(ep, out + ".tmp")
        os.replace(out + ".tmp", out)
    with open(out + ".json", "w") as f:
        json.dump(dict(architecture=im.name, input_size=[im.in_chans, im.img_size, im.img_size], mean=im.mean,
                       std=im.std, crop_pct=im.crop_pct, interpolation=im.interpolation, classes=im.classes), f,
                  indent=2)
    return out, err


def run(args: argparse.Namespace) -> int:
    out, err = export_model(args.checkpoint, args.format, args.out, args.ema, args.opset, args.atol, args.check)
    note = f" (onnxruntime vs PyTorch: max |diff| {err:.1e})" if err is not None else ""
    print(f"wrote {out}{note}", file=sys.stderr)
    return 0
