"""``vitlab export --checkpoint C --format onnx|exported``: the model for deployment.

* ``onnx``: ``torch.onnx.export`` (opset 18, a dynamic batch dimension), then checked: the file
  is run with onnxruntime on a random batch and its logits must match PyTorch's (max abs
  difference at most ``--atol``, default 1e-4), else the export fails and the file is removed;
* ``exported``: ``torch.export`` saved as a ``.pt2`` program (``torch.export.load`` reads it),
  checked the same way: the loaded program's logits on another batch size must match eager
  PyTorch's (equal in practice: the same aten ops).
Both export the model in eval mode, float32, with the preprocessing recorded next to it
(``<out>.json``: image size, channels, mean, std, crop_pct, class names), and with a dynamic
batch dimension (1 to 1024).  While tracing, the MLP's size-dependent chunked inference path is
off (its size test would pin the batch range), and for ONNX attention runs on the math SDPA
kernel (its output strides are those of the decomposed graph that ONNX receives).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

__all__ = ["add_arguments", "run", "export_model"]

MAX_BATCH = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a vitlab checkpoint, run directory or model directory")
    p.add_argument("--format", default="onnx", choices=["onnx", "exported"], help="onnx (default) or exported (.pt2)")
    p.add_argument("--out", help="output file (default: next to the checkpoint, model.onnx / model.pt2)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a training checkpoint")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--atol", type=float, default=1e-4, help="max |exported - PyTorch| logit difference allowed")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the check against PyTorch (onnxruntime, or the loaded .pt2 program)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")


def _fail_if_off(path: str, err: float, atol: float, what: str) -> float:
    if not err <= atol:  # (NaN fails too)
        from vitlab.errors import UserError

        os.remove(path)
        raise UserError(f"{what} export of {path} differs from PyTorch by {err:.2e} (> --atol {atol:g}); file removed")
    return err


def _check_onnx(path: str, model, x, atol: float) -> float:
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return _fail_if_off(path, float(np.abs(got - want).max()), atol, "ONNX")


def _check_exported(path: str, model, x, atol: float) -> float:
    import torch

    with torch.no_grad():
        got, want = torch.export.load(path).module()(x), model(x)
    return _fail_if_off(path, float((got - want).abs().max()), atol, "torch.export")


@contextlib.contextmanager
def _tracing(onnx: bool):
    """Model settings while tracing: no size-dependent chunked MLP path (vitlab.layers.mlp; its
    ``hidden bytes > chunk_bytes`` test would add a guard capping the batch dimension), and for
    ONNX the math SDPA kernel (the fused CPU kernel returns other strides than the decomposed
    attention that the ONNX exporter lowers, and a traced ``view`` then fails)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitlab.layers.mlp import Mlp

    saved = Mlp.chunk_bytes
    Mlp.chunk_bytes = 0
    try:
        with sdpa_kernel(SDPBackend.MATH) if onnx else contextlib.nullcontext():
            yield
    finally:
        Mlp.chunk_bytes = saved


def _batch_dim():
    import torch

    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def _onnx(model, x, out: str, opset: int) -> None:
    import torch

    from vitlab.errors import UserError

    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the 'onnx', 'onnxscript' and 'onnxruntime' packages: "
                        "pip install onnx onnxscript onnxruntime") from None
    with _tracing(onnx=True):
        prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["images"],
                                 output_names=["logits"], dynamic_shapes=({0: _batch_dim()},), verbose=False)
    prog.save(out + ".tmp")
    os.replace(out + ".tmp", out)


def _exported(model, x, out: str) -> None:
    import torch

    with _tracing(onnx=False):
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: _batch_dim()},))
    tmp = out + ".tmp.pt2"  # torch.export.save warns about names not ending in .pt2
    torch.export.save(ep, tmp)
    os.replace(tmp, out)


def export_model(checkpoint: str, fmt: str = "onnx", out=None, ema: bool = False, opset: int = 18,
                 atol: float = 1e-4, check: bool = True):
    """Export; returns ``(path, max abs difference to PyTorch on another batch size, or None
    without ``check``)``."""
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
        _exported(model, x, out)
        if check:
            err = _check_exported(out, model, model_input(im, batch=3), atol)
    with open(out + ".json", "w") as f:
        json.dump(dict(architecture=im.name, input_size=[im.in_chans, im.img_size, im.img_size], mean=im.mean,
                       std=im.std, crop_pct=im.crop_pct, interpolation=im.interpolation, classes=im.classes), f,
                  indent=2)
    return out, err


def run(args: argparse.Namespace) -> int:
    out, err = export_model(args.checkpoint, args.format, args.out, args.ema, args.opset, args.atol, args.check)
    what = "onnxruntime" if args.format == "onnx" else "loaded program"
    note = f" ({what} vs PyTorch: max |diff| {err:.1e})" if err is not None else ""
    print(f"wrote {out}{note}", file=sys.stderr)
    return 0
