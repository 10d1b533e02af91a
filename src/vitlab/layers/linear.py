"""Linear layers on oneDNN's kernel for CPU inference (the fast path of every token projection).

Without autograd, on the CPU and in float32, a linear layer (optionally with its activation fused) runs through
``torch.ops.mkldnn._linear_pointwise``, the oneDNN matmul PyTorch's own inductor uses for frozen CPU graphs,
instead of ``addmm``'s MKL sgemm.  On this project's CPUs (AVX-512) it is 10-30 % faster for the token
projections of a ViT (``benchmarks/RESULTS.md``), and the activation is applied while the tile is in the
cache.  The result is float32 arithmetic in another summation order: it agrees with ``F.linear`` to a few
float32 ulps of the sum (tests/test_linear.py checks it against a float64 reference).

Under CPU bf16 autocast (``vitlab train/eval --amp bf16``, ``torch.autocast("cpu", torch.bfloat16)``) the same
op runs in bf16, as autocast's own ``linear`` would (bf16 inputs, float32 accumulation, bf16 output), but with the
bf16 copy of each weight matrix cast once and kept (:func:`clear_bf16_weights`), not re-cast on every call, and with
the activation fused before the output is rounded.  The copy is keyed on the weight's storage and version
counter, so an in-place update (an optimizer step, ``load_state_dict``) makes a fresh one.

The fast path is off wherever the oneDNN op cannot follow: with autograd on (the op has no backward),
while tracing, compiling, exporting or under ``torch.func`` transforms, under autocast to float16, for other
dtypes and devices, for tensor subclasses.  ``VITLAB_ONEDNN_LINEAR=0`` in the environment or
:func:`set_onednn_linear(False) <set_onednn_linear>` turns it off.  :class:`Linear` is an ``nn.Linear``
(same parameters, state-dict keys, init and ``isinstance``), so timm's weights and every tool see no difference.
"""
from __future__ import annotations

import os
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "linear_act", "onednn_linear_enabled", "set_onednn_linear", "FUSED_ACTIVATIONS",
           "clear_bf16_weights"]

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = os.environ.get("VITLAB_ONEDNN_LINEAR", "1") != "0"
_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_BF16 = _AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_bf16_weights: Dict[int, Tuple[weakref.ref, tuple, torch.Tensor]] = {}


def set_onednn_linear(enabled: bool) -> bool:
    """Turn the oneDNN inference path on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def onednn_linear_enabled() -> bool:
    """True when the oneDNN path is switched on and this PyTorch build has the op."""
    return _AVAILABLE and _enabled


# activation module type -> oneDNN post-op (attr, algorithm); GELU is handled with its ``approximate``
FUSED_ACTIVATIONS = {nn.ReLU: ("relu", ""), nn.SiLU: ("swish", ""), nn.Hardswish: ("hardswish", ""),
                     nn.Sigmoid: ("sigmoid", ""), nn.Tanh: ("tanh", "")}


def _act_attr(act: nn.Module):
    """oneDNN post-op ``(attr, algorithm)`` for an activation module, or None (exact types only)."""
    if type(act) is nn.GELU:
        return "gelu", act.approximate
    return FUSED_ACTIVATIONS.get(type(act))


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype the oneDNN path runs in for this call (float32, or bf16 under CPU bf16 autocast), else None."""
    # compiling first: dynamo folds it to a constant, and must not trace the functorch query below (a graph break)
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing() or _exporting():
        return None
    if not onednn_linear_enabled() or torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    if type(x) is not torch.Tensor or x.dim() < 2 or _wrapped(x) or weight.device.type != "cpu":
        return None
    if weight.dtype is not torch.float32 or (bias is not None and (bias.dtype is not torch.float32
                                                                   or bias.device.type != "cpu")):
        return None
    if torch.onnx.is_in_onnx_export():
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype is torch.float32 else None
    bf16 = _BF16 and torch.get_autocast_dtype("cpu") is torch.bfloat16 and not weight.is_inference()
    return torch.bfloat16 if bf16 and x.dtype in (torch.float32, torch.bfloat16) else None


def _bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 copy of ``weight``, cast on first use and kept while the weight does not change in place."""
    key = (weight.data_ptr(), weight._version)
    hit = _bf16_weights.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    wb = weight.to(torch.bfloat16)
    if hit is None:  # forget the copy when the weight goes
        weakref.finalize(weight, _bf16_weights.pop, id(weight), None)
    _bf16_weights[id(weight)] = (weakref.ref(weight), key, wb)
    return wb


def clear_bf16_weights() -> int:
    """Drop the kept bf16 weight copies (they are made again on the next bf16 autocast call); returns how many."""
    n = len(_bf16_weights)
    _bf16_weights.clear()
    return n


def _pointwise(x, weight, bias, dtype, attr: str, algorithm: str) -> torch.Tensor:
    if dtype is torch.bfloat16:
        # biases are small (and some are built per call, e.g. q/k/v biases concatenated): cast each time
        weight, bias = _bf16_weight(weight), None if bias is None else bias.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


if _AVAILABLE:  # so that FlopCounterMode (vitlab.bench.count_flops, users' own counters) counts the fast path
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_pointwise_flop(x_shape, w_shape, *args, **kwargs) -> int:
        """``2 M K N`` as timm's and torch's own count of ``addmm`` (the bias and post-op are not counted)."""
        rows = 1
        for s in x_shape[:-1]:
            rows *= s
        return 2 * rows * w_shape[1] * w_shape[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN's kernel where the fast path applies."""
    dtype = _eligible(x, weight, bias)
    if dtype is not None:
        return _pointwise(x, weight, bias, dtype, "none", "")
    return F.linear(x, weight, bias)


def linear_act(fc: nn.Linear, act: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``act(fc(x))`` as one oneDNN call (activation as a post-op), or None when it cannot be fused (the
    caller then runs ``fc`` and ``act`` itself).  ``fc`` and ``act`` must carry no forward hooks."""
    attr = _act_attr(act)
    dtype = None if attr is None else _eligible(x, fc.weight, fc.bias)
    if dtype is None:
        return None
    return _pointwise(x, fc.weight, fc.bias, dtype, *attr)


class Linear(nn.Linear):
    """``nn.Linear`` whose inference forward takes the oneDNN path (:mod:`vitlab.layers.linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
