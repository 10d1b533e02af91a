"""Modifiers: parts that act on the attention logits or probabilities (DESIGN.md, "modifier").

Each has ``on_logits`` / ``on_probs`` for the explicit path; a modifier that can act without the
matrix (``needs_matrix = False``) also has ``on_output``, used on the fused path.  ``heads`` is the
slice of heads the call holds (CSwin's stripes attend with half the heads at a time).
"""
from __future__ import annotations

import torch
from torch import nn

from vitlab.layers.attn_parts import MODIFIERS, AttentionPart

__all__ = ["AttnScale", "AttnScaleModifier", "TalkingHeads", "ReAttention"]


class _Modifier(AttentionPart):
    kind = "modifier"
    needs_matrix = True
    mixes_heads = False

    def on_logits(self, host, logits: torch.Tensor, heads: slice) -> torch.Tensor:
        return logits

    def on_probs(self, host, probs: torch.Tensor, heads: slice) -> torch.Tensor:
        return probs

    def on_output(self, host, out: torch.Tensor, v: torch.Tensor, heads: slice) -> torch.Tensor:
        raise NotImplementedError(f"modifier {self.name} needs the attention matrix")


class AttnScale(nn.Module):
    """AttnScale: ``A_hat = A + omega_h * (A - 1/N)``, one learnable ``omega`` per head (init 0).

    From "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis: From
    Theory to Practice" (Wang et al., ICLR 2022).  Since every row of ``A`` sums to 1,
    ``A_hat @ V = A @ V + omega * (A @ V - mean_j V_j)``, so the fused path needs no N x N matrix:
    :meth:`apply_to_output` does the same thing on the attention output.
    """

    def __init__(self, num_heads: int):
        super().__init__()
        self.omega = nn.Parameter(torch.zeros(num_heads))

    def forward(self, probs: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Re-weight probabilities ``(B, h, Nq, Nk)``."""
        w = self.omega[heads].view(1, -1, 1, 1).to(probs.dtype)
        return probs + w * (probs - 1.0 / probs.shape[-1])

    def apply_to_output(self, out: torch.Tensor, v: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Same operator after ``A @ V``: ``out (B, h, Nq, d)``, ``v (B, h, Nk, d)``."""
        w = self.omega[heads].view(1, -1, 1, 1).to(out.dtype)
        return out + w * (out - v.mean(dim=-2, keepdim=True))


@MODIFIERS.register("attnscale")
class AttnScaleModifier(_Modifier):
    """:class:`AttnScale` as a modifier (host attribute ``attn_scale``)."""

    needs_matrix = False

    def setup(self, host) -> None:
        host.attn_scale = AttnScale(host.num_heads)

    def on_probs(self, host, probs, heads):
        return host.attn_scale(probs, heads)

    def on_output(self, host, out, v, heads):
        return host.attn_scale.apply_to_output(out, v, heads)


def _mix_heads(t: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    return proj(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@MODIFIERS.register("talking_heads")
class TalkingHeads(_Modifier):
    """Talking-heads attention ("Talking-Heads Attention", Shazeer et al., 2020; used by CaiT): a
    learned ``heads x heads`` map mixes the heads' logits before the softmax (``proj_l``) and their
    probabilities after it (``proj_w``).  Names as timm's ``TalkingHeadAttn``."""

    mixes_heads = True

    def setup(self, host) -> None:
        host.proj_l = nn.Linear(host.num_heads, host.num_heads)
        host.proj_w = nn.Linear(host.num_heads, host.num_heads)

    def on_logits(self, host, logits, heads):
        return _mix_heads(logits, host.proj_l)

    def on_probs(self, host, probs, heads):
        return _mix_heads(probs, host.proj_w)


@MODIFIERS.register("reattention")
class ReAttention(_Modifier):
    """Re-attention ("DeepViT: Towards Deeper Vision Transformer", Zhou et al., 2021, eq. 4):
    ``Norm(Theta^T A)``, a learnable ``heads x heads`` map ``Theta`` (``reattn``, a 1x1 conv over
    the heads as in the official code) mixing the heads' probability maps, then BatchNorm over the
    heads (``reattn_norm``; the paper's Norm).  ``Theta`` starts at the identity, so a new block starts
    as plain attention (the official code starts from a random init).  ``reattn_scale`` multiplies the result by
    ``head_dim ** -0.5`` (the official DeepViT-S's ``transform_scale=True``)."""

    mixes_heads = True

    def __init__(self, reattn_scale: bool = False):
        self.reattn_scale = reattn_scale

    def setup(self, host) -> None:
        h = host.num_heads
        host.reattn = nn.Conv2d(h, h, 1)
        with torch.no_grad():
            host.reattn.weight.copy_(torch.eye(h).view(h, h, 1, 1))
            host.reattn.bias.zero_()
        host.reattn_norm = nn.BatchNorm2d(h)

    def on_probs(self, host, probs, heads):
        out = host.reattn_norm(host.reattn(probs))
        return out * host.head_dim ** -0.5 if self.reattn_scale else out
