"""The residual wiring shared by the transformer blocks (ViT, Swin, CSwin, PVT).

A block is two residual halves.  Pre-norm (ViT, Swin, PVT): ``x + DropPath(ls1(FeatScale(
mix(norm1(x)))))`` then ``x + DropPath(ls2(mlp(norm2(x))))``.  ``post_norm`` (LipsFormer):
``norm1(x + DropPath(ls1(mix(x))))`` then ``norm2(x + DropPath(ls2(mlp(x))))``.  Optional
``conv_units`` (LipsFormer's depthwise-conv residual units) run before the attention half.
Without autograd the sums are written into the branch outputs (:mod:`vitlab.layers.inplace`).

A block class mixes in :class:`ResidualHalves`, owns the attributes ``norm1, featscale, ls1,
drop_path1, norm2, mlp, ls2, drop_path2, attn, post_norm, conv_units`` and says how its
token mixer is called (:meth:`ResidualHalves._mix`), with what context (``*ctx``: e.g. the
token grid), and how a conv unit is called (:meth:`ResidualHalves._unit_args`).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from vitlab.layers.inplace import residual_add

__all__ = ["ResidualHalves"]


class ResidualHalves:
    """Mixin: ``attn_half(x, *ctx)``, ``mlp_half(x, *ctx)`` and ``forward(x, *ctx)`` of a block."""

    # Defaults for blocks without these parts.  Submodule slots (conv_units, featscale) must not be
    # class attributes here: a class attribute would shadow the submodule nn.Module registers.
    post_norm: bool = False

    def _mix(self, x: torch.Tensor, *ctx: Any) -> torch.Tensor:
        """The token mixer on (normalised) tokens; ``ctx`` as given to ``attn_half``."""
        raise NotImplementedError

    def _unit_args(self, *ctx: Any) -> Tuple[Any, ...]:
        """Arguments after ``x`` of a conv unit call (default: the block's context)."""
        return ctx

    def _mlp(self, x: torch.Tensor, *ctx: Any) -> torch.Tensor:
        return self.mlp(x)

    def attn_half(self, x: torch.Tensor, *ctx: Any) -> torch.Tensor:
        units = getattr(self, "conv_units", None)
        for unit in units if units is not None else ():
            x = unit(x, *self._unit_args(*ctx))
        y = self._mix(x if self.post_norm else self.norm1(x), *ctx)
        featscale = getattr(self, "featscale", None)
        if featscale is not None:
            y = featscale(y)
        x = residual_add(x, self.drop_path1(self.ls1(y)), self.attn, featscale, self.ls1, self.drop_path1)
        return self.norm1(x) if self.post_norm else x

    def mlp_half(self, x: torch.Tensor, *ctx: Any) -> torch.Tensor:
        y = self.drop_path2(self.ls2(self._mlp(x if self.post_norm else self.norm2(x), *ctx)))
        x = residual_add(x, y, self.mlp, self.ls2, self.drop_path2)
        return self.norm2(x) if self.post_norm else x

    def forward(self, x: torch.Tensor, *ctx: Any) -> torch.Tensor:
        return self.mlp_half(self.attn_half(x, *ctx), *ctx)
