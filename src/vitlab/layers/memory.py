"""Learnable memory tokens appended to the keys and values of attention.

"Fine-tuning Image Transformers using Learnable Memory", Sandler, Zhmoginov, Vladymyrov and Jackson,
CVPR 2022, sec. 3: each attention layer gets ``m`` learned memory tokens that the real tokens attend to
(as keys and values) but that ask nothing (no queries, no outputs), so the token count is unchanged.

* :class:`MemoryProjection` (projection ``"memory"``, DESIGN.md's projection seam): a ``qkv`` Linear as
  :class:`~vitlab.layers.projection.LinearProjection`, keys and values from ``[x; memory]``;
  ``memory (1, m, dim)`` lives on the attention module (``attn.memory``).
* :class:`MemoryReadout`: new queries (the memory adapter's new class token) read ``[tokens; memory]``
  through a *frozen* attention's own parts, which stays untouched (:mod:`vitlab.models.memory`).

The memory joins after the block's norm (the branch input), as vit-pytorch's ``learnable_memory_vit``.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from vitlab.layers.attn_parts import PROJECTIONS
from vitlab.layers.projection import LinearProjection
from vitlab.layers.recording import RecordsAttention

__all__ = ["MemoryProjection", "MemoryReadout", "with_memory"]


def with_memory(xkv: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` key/value tokens followed by the ``(1, m, C)`` memory tokens: ``(B, N + m, C)``."""
    return torch.cat([xkv, memory.to(xkv.dtype).expand(xkv.shape[0], -1, -1)], dim=1)


@PROJECTIONS.register("memory")
class MemoryProjection(LinearProjection):
    """``q`` from the tokens, ``k, v`` from the tokens and ``num_memory`` learned memory tokens
    (Sandler et al., CVPR 2022, sec. 3.1); the weights are one ``qkv`` Linear (timm's name), the memory is
    ``memory (1, m, dim)``, drawn from a truncated normal (std 0.02)."""

    def __init__(self, num_memory: int = 4, qkv_bias: bool = True, qk_norm: Union[bool, str] = False):
        if num_memory < 1:
            raise ValueError(f"num_memory must be >= 1, got {num_memory}")
        super().__init__(qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.num_memory = num_memory

    def setup(self, host) -> None:
        for p in (host.core, *host.positions):  # setup runs after the core and position parts are built
            if getattr(p, "linear_cost", False) or getattr(p, "logit_bias", False) or hasattr(p, "on_qk"):
                raise ValueError(f"projection 'memory' adds {self.num_memory} keys that have no place on the token "
                                 f"grid; {p.kind} '{p.name}' needs every key on the grid")
        super().setup(host)
        host.memory = nn.Parameter(torch.empty(1, self.num_memory, host.dim))
        nn.init.trunc_normal_(host.memory, std=0.02)

    def __call__(self, host, xq, xkv):
        return super().__call__(host, xq, with_memory(xkv, host.memory))  # xq is not the keys: split weights


class MemoryReadout(RecordsAttention, nn.Module):
    """``num_memory`` memory tokens ``tokens (1, m, dim)`` and the attention of new queries over
    ``[tokens; memory]`` through a host attention's projection, core and output projection (the host's
    own weights, not changed): the memory adapter's new class token in one frozen layer (Sandler et
    al., CVPR 2022, sec. 3.2).  Records its ``(B, heads, Nq, N + m)`` probabilities."""

    def __init__(self, dim: int, num_memory: int):
        super().__init__()
        if num_memory < 0:
            raise ValueError(f"num_memory must be >= 0, got {num_memory}")
        self.tokens = nn.Parameter(torch.empty(1, num_memory, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def forward(self, host: nn.Module, xq: torch.Tensor, xkv: torch.Tensor) -> torch.Tensor:
        """``xq (B, Nq, dim)`` queries over ``xkv (B, N, dim)`` and the memory -> ``(B, Nq, dim)``."""
        q, k, v = host.core.prepare(host, *host.projection(host, xq, with_memory(xkv, self.tokens)))
        probs = host.core.normalize(host, host.core.logits(host, q, k))
        self._record(probs)
        out = host.core.finish(host, host.attn_drop(probs) @ v, None)  # a core's output step (differential)
        return host.proj_drop(host.proj(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)))
