"""The token layout that travels with the tokens: grid shape and prefix-token count."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch

__all__ = ["TokenLayout", "as_layout"]


@dataclass(frozen=True)
class TokenLayout:
    """``(B, P + prod(grid), C)`` tokens: ``num_prefix`` leading tokens (class, distillation,
    register tokens), then the grid in raster order.  ``grid`` has any rank (2-D for images).

    ``mask`` (optional) says which keys each query may attend to, for every attention call on these
    tokens: boolean (``True``: attend, SDPA's convention) or additive (0 / ``-inf``), ``(B, N, N)`` or a
    key-padding ``(B, N)``; e.g. NaViT's block-diagonal mask of packed images (:meth:`with_mask`).  It is
    left out of equality, hashing and ``repr`` (a tensor has no truth value): layouts compare by shape.
    """

    grid: Tuple[int, ...]
    num_prefix: int = 0
    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if any(g < 1 for g in self.grid) or self.num_prefix < 0:
            raise ValueError(f"a token layout needs a positive grid and num_prefix >= 0, got {self}")
        m = self.mask
        if m is not None and (m.ndim not in (2, 3) or m.shape[-1] != self.num_tokens
                              or not (m.dtype == torch.bool or m.is_floating_point())):
            raise ValueError(f"an attention mask must be boolean or float, (B, N) or (B, N, N) with N = "
                             f"{self.num_tokens} tokens; got {m.dtype} of shape {tuple(m.shape)}")

    def with_mask(self, mask: Optional[torch.Tensor]) -> "TokenLayout":
        """This layout carrying ``mask`` (see the class docstring; ``None`` removes it)."""
        return replace(self, mask=mask)

    @property
    def hw(self) -> Tuple[int, int]:
        if len(self.grid) != 2:
            raise ValueError(f"this part needs a 2-D token grid, got grid {self.grid}")
        return self.grid  # type: ignore[return-value]

    @property
    def num_grid(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_grid

    def check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"got {x.shape[1]} tokens, but the layout {self.grid} + {self.num_prefix} prefix "
                             f"holds {self.num_tokens}")

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """Grid tokens of ``(B, N, C)`` as a ``(B, C, *grid)`` map (prefix tokens dropped)."""
        t = x[:, self.num_prefix:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)

    def from_map(self, fm: torch.Tensor, prefix: torch.Tensor = None) -> torch.Tensor:
        t = fm.flatten(2).transpose(1, 2)
        return torch.cat([prefix, t], dim=1) if prefix is not None and prefix.shape[1] else t


def as_layout(n: int, grid=None, num_prefix: int = 0) -> TokenLayout:
    """The layout of ``n`` tokens: ``grid`` if given, else the square grid of ``n - num_prefix``."""
    if grid is None:
        side = math.isqrt(n - num_prefix)
        if side * side != n - num_prefix:
            raise ValueError(f"cannot infer a square token grid from {n - num_prefix} tokens; pass a layout")
        grid = (side, side)
    return TokenLayout(tuple(grid), num_prefix)
