"""Reading attention probabilities without touching the fast path.

Every mixer that has an attention matrix derives from :class:`RecordsAttention`.  By
default ``_attn_sink`` is ``None`` and the mixer runs its fused kernel (e.g. SDPA).  Inside
``with record_attention(model) as rec:`` each such mixer computes its probabilities
explicitly (for linear attention: the implied N x N matrix) and hands them to the recorder.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["RecordsAttention", "AttentionRecorder", "record_attention", "attention_modules"]


class RecordsAttention:
    """Mixin for token mixers with an attention matrix.

    Subclasses call ``self._record(probs)`` with probabilities of shape
    ``(B, heads, N_query, N_key)`` when ``self.recording`` is true.
    """

    _attn_sink: Optional[Callable[..., None]] = None

    @property
    def recording(self) -> bool:
        return self._attn_sink is not None

    def _record(self, probs: torch.Tensor, layout=None) -> None:
        """Hand ``probs`` to the recorder with the :class:`~vitlab.layers.TokenLayout` of the keys of
        each group (``None`` when the groups have no one grid)."""
        if self._attn_sink is not None:
            self._attn_sink(probs, layout)


class AttentionRecorder:
    """Holds the recorded maps: ``maps[name]`` is a list (one per forward call) of
    ``(B, heads, N_query, N_key)`` tensors, ``layouts[name]`` the token layout of each map's keys
    (grid and prefix tokens of one attention group, e.g. a window); ``names`` keeps module order."""

    def __init__(self, detach: bool = True, to_cpu: bool = False):
        self.detach = detach
        self.to_cpu = to_cpu
        self.maps: Dict[str, List[torch.Tensor]] = {}
        self.layouts: Dict[str, List[object]] = {}
        self.names: List[str] = []

    def sink_for(self, name: str) -> Callable[..., None]:
        self.names.append(name)
        self.maps[name] = []
        self.layouts[name] = []

        def sink(p: torch.Tensor, layout=None) -> None:
            self.layouts[name].append(layout)
            if self.detach:
                p = p.detach()
            if self.to_cpu:
                p = p.cpu()
            self.maps[name].append(p)

        return sink

    def last(self) -> Dict[str, torch.Tensor]:
        """The latest map of every module that recorded one, in module order."""
        return {n: self.maps[n][-1] for n in self.names if self.maps[n]}

    def last_layouts(self) -> Dict[str, object]:
        """The layout of each map of :meth:`last`."""
        return {n: self.layouts[n][-1] for n in self.names if self.layouts[n]}

    def clear(self) -> None:
        for v in (*self.maps.values(), *self.layouts.values()):
            v.clear()


def attention_modules(model: nn.Module) -> Iterator[tuple]:
    for name, m in model.named_modules():
        if isinstance(m, RecordsAttention):
            yield name, m


@contextmanager
def record_attention(model: nn.Module, detach: bool = True, to_cpu: bool = False):
    """Context manager: ``with record_attention(model) as rec: model(x)``; then
    ``rec.last()`` maps module names to attention probabilities."""
    rec = AttentionRecorder(detach=detach, to_cpu=to_cpu)
    mods = list(attention_modules(model))
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules to record")
    before = [(m, vars(m).get("_attn_sink", rec)) for _, m in mods]  # rec: "no instance attribute"
    try:
        for name, m in mods:
            m._attn_sink = rec.sink_for(name)
        yield rec
    finally:  # each module as it was: an enclosing recording keeps its sink, none leaves no attribute behind
        for m, sink in before:
            if sink is rec:
                vars(m).pop("_attn_sink", None)
            else:
                m._attn_sink = sink
