"""The two parts of "Vision Transformer for Small-Size Datasets" (Lee, Lee & Song, 2021):

* shifted patch tokenization (``embed="spt"``, sec. 3.2): the image and its four diagonal shifts by half a
  patch, concatenated on the channels, patchified, LayerNorm, Linear;
* locality self-attention (``modifiers=("lsa",)``, sec. 3.3): a learned temperature per head and the diagonal
  masked out of the logits, so no token attends to itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.attn_parts import MODIFIERS
from vitlab.layers.modifiers import _Modifier
from vitlab.layers.patch_embed import EMBEDS, PatchEmbed
from vitlab.layers.rope import queries_are_keys

__all__ = ["ShiftedPatchTokenization", "LocalitySelfAttention", "shifted_views"]


def shifted_views(x: torch.Tensor, shift) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 5C, H, W)``: ``x`` then its shifts by ``shift = (sh, sw)`` pixels, zero-filled,
    in the official code's order: content moved down-right, down-left, up-right, up-left (crops of the padded
    image at offsets ``(0, 0), (0, 2sw), (2sh, 0), (2sh, 2sw)``)."""
    sh, sw = shift
    h, w = x.shape[-2:]
    xp = F.pad(x, (sw, sw, sh, sh))
    crops = [xp[..., i:i + h, j:j + w] for i, j in ((0, 0), (0, 2 * sw), (2 * sh, 0), (2 * sh, 2 * sw))]
    return torch.cat([x, *crops], dim=1)


@EMBEDS.register("spt")
class ShiftedPatchTokenization(PatchEmbed):
    """Shifted patch tokenization (Lee et al., 2021, sec. 3.2, eq. 4-5): :func:`shifted_views` by half a patch,
    patches flattened as ``(p1 p2 c)`` (the official code's order), ``patch_norm`` (LayerNorm over the
    ``5 * C * p * p`` values) and ``proj`` (Linear to ``embed_dim``).  Same grid as the linear patchify, so
    any isotropic backbone takes it (``embed="spt"``)."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Optional[nn.Module] = None, bias: bool = True, dynamic_img_size: bool = False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, norm_layer, bias, dynamic_img_size)
        ph, pw = self.patch_size
        self.shift = (ph // 2, pw // 2)
        patch_dim = 5 * in_chans * ph * pw
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C', H, W)`` -> ``(B, h*w, p1*p2*C')`` raster-order patches."""
        b, c, h, w = x.shape
        ph, pw = self.patch_size
        x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)

    def forward(self, x: torch.Tensor):
        """``(B, C, H, W)`` -> ``(B, N, embed_dim)`` tokens (``(tokens, grid)`` with ``dynamic_img_size``)."""
        self.check(x)
        tokens = self.norm(self.proj(self.patch_norm(self.patchify(shifted_views(x, self.shift)))))
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        return (tokens, grid) if self.dynamic_img_size else tokens


@MODIFIERS.register("lsa")
class LocalitySelfAttention(_Modifier):
    """Locality self-attention (Lee et al., 2021, sec. 3.3): the logits ``q . k`` are multiplied by a learned
    temperature per head (``lsa_temperature``, init the core's own scale, ``head_dim ** -0.5`` for softmax;
    linear space, one per head, as the official code -- vit-pytorch keeps one scalar in log space) and the
    diagonal is masked (``finfo.min``: probability exactly 0), so a token never attends to itself.  Needs the
    matrix; refused where a query is not one of the keys (class-token queries, spatially reduced keys)."""

    def setup(self, host) -> None:
        if not queries_are_keys(host):
            raise ValueError(f"modifier 'lsa' cannot be combined with grouping '{host.grouping.name}' here: its "
                             "queries are not the keys, so there is no diagonal to mask")
        host.lsa_temperature = nn.Parameter(torch.full((host.num_heads,), float(host.core.scale(host))))

    def on_logits(self, host, logits: torch.Tensor, heads: slice) -> torch.Tensor:
        nq, nk = logits.shape[-2:]
        if nq != nk:
            raise ValueError(f"modifier 'lsa' needs square attention maps (queries = keys), got {nq}x{nk}")
        # the temperature replaces the core's fixed scale, which the logits already carry
        t = host.lsa_temperature[heads].view(1, -1, 1, 1).to(logits.dtype) / host.core.scale(host)
        eye = torch.eye(nq, dtype=torch.bool, device=logits.device)
        return (logits * t).masked_fill(eye, torch.finfo(logits.dtype).min)
