"""LookupViT, built from vitlab parts.

"LookupViT: Compressing visual information to a limited number of tokens" (Koner, Jain, Jain, Tresp & Paul, ECCV
2024).  The image is patchified into ``N`` *lookup* tokens (plus a learned position table); ``M`` *compressed*
tokens are the lookup map bilinearly resized to ``m x m`` (sec. 3.1).  Each block (sec. 3.2) runs

    gathering     x_p = x_p + MHBC_{p<-l}(LN(x_p), LN(x_l))                  compressed tokens read the lookup ones
    compressed    x_p = Block(x_p)                                           the one vitlab Block, any parts
    propagation   x_l = x_l + MHBC_{l<-p}(LN(x_p)), the gathering logits transposed
    lookup MLP    x_l = x_l + MLP_l(LN(x_l))                                 a narrow MLP (``lookup_mlp_ratio``)

with :class:`~vitlab.layers.bidirectional.BidirectionalCrossAttention`, so the quadratic attention only ever sees
the ``M`` compressed tokens.  The classifier averages the normalised compressed tokens.

The streams travel as one sequence, the compressed tokens as its prefix (``TokenLayout(lookup grid,
num_prefix=M)``): the isotropic :class:`~vitlab.models.backbone.Backbone` taps every block, and
``forward_intermediates`` gives the lookup maps.  Parts as in every family, for the compressed tokens' Block:
``mixer``, ``core``, ``modifiers``, ``attn_position`` (the compressed tokens' self-attention), ``mixer_kwargs``,
``norm`` (every norm), ``branch_scale`` / ``shortcut_init``, ``featscale``, ``wiring``, ``init``.  No official code is
public (none in google-research/scenic or big_vision) and the paper's size table was not at hand: sizes follow ViT-B/16
with 10 x 10 compressed tokens and a lookup MLP of width ``dim`` (this reading of sec. 3.2 is vitlab's); the count is
reconciled with vit-pytorch's ``look_vit`` in the tests.  At 10 x 10 this costs more MACs than ViT-B/16 (18.4 G vs
17.6 G), not the abstract's 2x fewer FLOPs; the cost by grid (``compressed_size``, lookup MLP ratio 1 / 4;
``vitlab.models.cli.count_macs`` at 224 px): 3 x 3 8.1 / 16.4 G, 5 x 5 9.9 / 18.2 G, 7 x 7 12.6 / 20.9 G, 10 x 10
18.4 / 26.7 G, so the abstract's factor fits a 3 x 3 or 5 x 5 grid with the narrow lookup MLP under this reading.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import DropPath, Mlp, MixerSpec, PatchEmbed, TokenLayout, create_norm, init_weights
from vitlab.layers.bidirectional import BidirectionalCrossAttention
from vitlab.models.backbone import Backbone
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["LookupViT", "LookupBlock"]


class LookupBlock(nn.Module):
    """One LookupViT block (Koner et al., 2024, sec. 3.2) on ``[compressed; lookup]`` tokens: see the module
    docstring.  ``attn_half`` is gathering, the compressed Block and propagation; ``mlp_half`` the lookup MLP."""

    def __init__(self, dim: int, num_heads: int, block: Block, compressed_grid, lookup_mlp_ratio: float,
                 norm: str, norm_eps: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.compressed_grid = tuple(compressed_grid)
        self.norm_p, self.norm_l = create_norm(norm, dim, eps=norm_eps), create_norm(norm, dim, eps=norm_eps)
        self.cross = BidirectionalCrossAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.block = block
        self.norm_rev, self.norm_mlp = create_norm(norm, dim, eps=norm_eps), create_norm(norm, dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * lookup_mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attn_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        m = layout.num_prefix
        xp, xl = x[:, :m], x[:, m:]
        gathered, logits = self.cross.gather(self.norm_p(xp), self.norm_l(xl))
        xp = self.block(xp + self.drop_path(gathered), TokenLayout(self.compressed_grid))
        xl = xl + self.drop_path(self.cross.propagate(self.norm_rev(xp), logits))
        return torch.cat([xp, xl], dim=1)

    def mlp_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        m = layout.num_prefix
        return torch.cat([x[:, :m], x[:, m:] + self.drop_path(self.mlp(self.norm_mlp(x[:, m:])))], dim=1)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.mlp_half(self.attn_half(x, layout), layout)


class LookupViT(Backbone):
    """LookupViT (Koner et al., ECCV 2024) whose parts are arguments; see the module docstring.  Sizes:
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` (compressed tokens), ``lookup_mlp_ratio``,
    ``patch_size`` (lookup tokens), ``compressed_size`` (``m``: ``m x m`` compressed tokens), ``patch_kernel`` (1:
    the paper's linear patch embedding; ``k``: a ``k x k`` conv over the patch map, vit-pytorch's stem)."""

    stage_attr = "blocks"
    features_fmt = "NLC"

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 lookup_mlp_ratio: float = 1.0, compressed_size: int = 10, patch_kernel: int = 1, qkv_bias: bool = True,
                 mixer: str = "softmax", core: Optional[str] = None, modifiers: Sequence[str] = (),
                 attn_position: Sequence[Any] = (), mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, branch_scale: Optional[str] = None,
                 shortcut: str = "plain", shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, architecture: str = "lookupvit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if compressed_size < 1 or depth < 1:
            raise ValueError(f"compressed_size and depth must be >= 1, got {compressed_size} and {depth}")
        self.num_classes, self.in_chans, self.embed_dim = num_classes, in_chans, embed_dim
        self.num_features, self.stem_reduction = embed_dim, patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        if patch_kernel != 1:  # a k x k conv over the patch map: one conv of k patches with the patch stride
            if patch_kernel < 1 or patch_kernel % 2 == 0:
                raise ValueError(f"patch_kernel must be odd and positive, got {patch_kernel}")
            self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size * patch_kernel, stride=patch_size,
                                              padding=patch_size * (patch_kernel // 2))
        self.grid_size = self.patch_embed.grid_size
        self.compressed_grid = (compressed_size, compressed_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid_size[0] * self.grid_size[1], embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        dpr = drop_path_rates(drop_path_rate, depth)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
        self.blocks = nn.Sequential(*[LookupBlock(
            embed_dim, num_heads, Block(embed_dim, spec.build(embed_dim, num_heads, TokenLayout(self.compressed_grid),
                                                             **attention),
                                        Mlp(embed_dim, int(embed_dim * mlp_ratio), drop=drop_rate), norm=norm,
                                        norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                                        branch_scale_init=shortcut_init, total_depth=depth, featscale=featscale,
                                        drop_path=dpr[i]),
            self.compressed_grid, lookup_mlp_ratio, norm, norm_eps, qkv_bias, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        self.norm = create_norm(norm, embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.patch_embed.img_size[0], num_classes,
                                                           in_chans)

    def forward_stem(self, x: torch.Tensor):
        """Image -> compressed tokens (the position-coded lookup map resized bilinearly to ``m x m``) then lookup
        tokens, ``(B, M + N, C)``, and ``TokenLayout(lookup grid, M)``."""
        self.check_input(x)
        lookup = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        fm = lookup.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)
        compressed = F.interpolate(fm, size=self.compressed_grid, mode="bilinear", align_corners=False)
        m = self.compressed_grid[0] * self.compressed_grid[1]
        return torch.cat([compressed.flatten(2).transpose(1, 2), lookup], dim=1), TokenLayout(self.grid_size, m)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the normalised compressed tokens."""
        return x[:, :self.compressed_grid[0] * self.compressed_grid[1]].mean(dim=1)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^patch_embed|^pos_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


register_recipe(LookupViT, "lookupvit_base_patch16_224", dict(compressed_size=10),
                "LookupViT-B/16 with 10x10 compressed tokens (Koner et al., ECCV 2024).")
