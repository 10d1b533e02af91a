"""When an intermediate tensor may be overwritten in place (the inference fast path).

On the CPU, a large fresh activation costs more than its arithmetic: the allocator hands out
pages that the kernel must fault in and zero.  Without autograd, a block can reuse buffers it
made itself (the activation overwrites the ``fc1`` output, the residual sum overwrites the
branch output) and so allocates, writes and reads less.  The results are bit-identical to the
out-of-place path (the same elementwise ops on the same values).

It is safe only when nobody else can hold the buffer: no autograd graph (``grad`` disabled),
no forward hook (a hook may keep a module's output) on the modules that produced it, and the
buffer is not a view of the tensor added to it.  Under ``torch.compile`` the eager fast paths are
off: inductor fuses and reuses buffers itself, and the storage checks would break the graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["overwritable", "residual_add", "INPLACE_ACTIVATIONS", "activate", "chunkable", "conv_bn_act"]


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def overwritable(*producers: Optional[nn.Module]) -> bool:
    """True when the outputs of ``producers`` may be overwritten: autograd off and no forward hook
    (module or global) on them or their submodules (a submodule's output may be the producer's
    output, e.g. the projection of an attention module).  ``None`` entries are skipped."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # compiled graphs: inductor reuses buffers
        return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return not any(_hooked(s) for m in producers if m is not None for s in m.modules())


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def residual_add(x: torch.Tensor, branch: torch.Tensor, *producers: Optional[nn.Module]) -> torch.Tensor:
    """``x + branch``; written into ``branch`` when :func:`overwritable` allows it (``branch`` is then
    the returned tensor; ``x`` is never modified)."""
    if (branch.shape == x.shape and branch.dtype == x.dtype and overwritable(*producers)
            and not _shares_storage(branch, x)):
        return branch.add_(x)
    return x + branch


# activation module type -> its in-place aten op (``approximate`` passed for GELU)
INPLACE_ACTIVATIONS = {
    nn.GELU: lambda m, h: torch.ops.aten.gelu_(h, approximate=m.approximate),
    nn.ReLU: lambda m, h: torch.relu_(h),
    nn.SiLU: lambda m, h: torch.ops.aten.silu_(h),
}


def activate(act: nn.Module, h: torch.Tensor, *producers: Optional[nn.Module]) -> torch.Tensor:
    """``act(h)``, in place on ``h`` when ``h`` is a fresh output of ``producers`` that nobody else
    holds and ``act`` is one of the plain activations of :data:`INPLACE_ACTIVATIONS`."""
    op = INPLACE_ACTIVATIONS.get(type(act))
    if op is not None and overwritable(act, *producers):
        return op(act, h)
    return act(h)


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (never for the meta device, which autocast does not know)."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def chunkable(x: torch.Tensor, *producers: Optional[nn.Module]) -> bool:
    """True when a no-autograd chunked path may replace the modules ``producers`` for input ``x``:
    :func:`overwritable`, and no autocast (the chunked paths write into buffers of ``x``'s dtype)."""
    return overwritable(*producers) and not autocast_on(x)


def conv_bn_act(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``act(bn(conv(x)))`` (``act=None``: ``bn(conv(x))``).  Without autograd, in float32 and with ``bn`` in
    eval mode (running statistics): one conv with the BatchNorm folded into its weight and bias
    (``w * g / sqrt(var + eps)``, ``(b - mean) * g / sqrt(var + eps) + beta``) and the activation in place, one
    pass over the output instead of three."""
    if (bn.training or bn.running_var is None or not overwritable(conv, bn, act)
            or autocast_on(x) or type(conv) is not nn.Conv2d or x.dtype != torch.float32):
        y = bn(conv(x))
        return y if act is None else act(y)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    scale = scale * bn.weight if bn.weight is not None else scale
    shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
    shift = shift * scale + bn.bias if bn.bias is not None else shift * scale
    y = conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)
    return y if act is None else activate(act, y, conv)
