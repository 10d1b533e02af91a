"""Linear layers on oneDNN's kernel for CPU inference (the fast path of every token projection).

Without autograd, on the CPU and in float32, a linear layer (optionally with its activation fused) runs through
``torch.ops.mkldnn._linear_pointwise``, the oneDNN matmul PyTorch's own inductor uses for frozen CPU graphs,
instead of ``addmm``'s MKL sgemm.  On this project's CPUs (AVX-512) it is 10-30 % faster for the token
projections of a ViT (``benchmarks/RESULTS.md``), and the activation is applied while the tile is in the
cache.  The result is float32 arithmetic in another summation order: it agrees with ``F.linear`` to a few
float32 ulps of the sum (tests/test_linear.py checks it against a float64 reference).

The fast path is off wherever the oneDNN op cannot follow: with autograd on (the op has no backward),
while tracing, compiling, exporting or under ``torch.func`` transforms, under autocast, for other dtypes and
devices, for tensor subclasses.  ``VITLAB_ONEDNN_LINEAR=0`` in the environment or
:func:`set_onednn_linear(False) <set_onednn_linear>` turns it off.  :class:`Linear` is an ``nn.Linear``
(same parameters, state-dict keys, init and ``isinstance``), so timm's weights and every tool see no difference.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "linear_act", "onednn_linear_enabled", "set_onednn_linear", "FUSED_ACTIVATIONS"]

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_enabled = os.environ.get("VITLAB_ONEDNN_LINEAR", "1") != "0"
_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


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


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if not onednn_linear_enabled() or torch.is_grad_enabled():
        return False
    if x.dtype is not torch.float32 or weight.dtype is not torch.float32 or x.device.type != "cpu":
        return False
    if type(x) is not torch.Tensor or x.dim() < 2 or _wrapped(x) or weight.device.type != "cpu":
        return False
    if bias is not None and (bias.dtype is not torch.float32 or bias.device.type != "cpu"):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _exporting():
        return False
    return not (torch.is_autocast_enabled("cpu") or torch.onnx.is_in_onnx_export())


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
    if _eligible(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_act(fc: nn.Linear, act: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``act(fc(x))`` as one oneDNN call (activation as a post-op), or None when it cannot be fused (the
    caller then runs ``fc`` and ``act`` itself).  ``fc`` and ``act`` must carry no forward hooks."""
    attr = _act_attr(act)
    if attr is None or not _eligible(x, fc.weight, fc.bias):
        return None
    return torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, attr[0], [], attr[1])


class Linear(nn.Linear):
    """``nn.Linear`` whose inference forward takes the oneDNN path (:mod:`vitlab.layers.linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
