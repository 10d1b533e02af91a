"""FeatScale: per-channel re-weighting of the DC and high-frequency parts of a branch output."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatScale"]


class FeatScale(nn.Module):
    """``S_hat = S + s * DC + t * (S - DC)`` with ``DC`` the mean over all tokens.

    From "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis:
    From Theory to Practice" (Wang et al., ICLR 2022).  ``s`` and ``t`` start at 0, so the
    module starts as the identity.  Input ``(B, N, C)``; for windowed models pass the whole
    stage map's tokens so the mean is over all of them.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(dim))
        self.t = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dc = x.mean(dim=1, keepdim=True)
        return x + self.s * dc + self.t * (x - dc)
