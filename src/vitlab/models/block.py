"""The one transformer ``Block`` of vitlab, configured by its parts.

Pre-norm (ViT, Swin, PVT): ``x + DropPath(ls1(FeatScale(mixer(norm1(x)))))`` then
``x + DropPath(ls2(mlp(norm2(x))))``.  ``wiring="post"`` (LipsFormer): ``norm1(x + DropPath(ls1(
mixer(x))))`` then ``norm2(x + DropPath(ls2(mlp(x))))``; ``"end"`` (LipsFormer-CSwin): no norm before
the branches and one norm at the end of the block (``norm2``); ``"prefix"`` (CaiT's class attention):
only the prefix (class) tokens are updated, by a mixer whose queries are the prefix tokens;
``"parallel"`` (ViT-22B, Dehghani et al., ICML 2023, sec. 2; GPT-J / PaLM): both branches read the same
input, ``x + DropPath(ls1(mixer(norm1(x)))) + DropPath(ls2(mlp(norm2(x))))``, so the block has no
separable halves (:meth:`Block.attn_half` is the whole block, :meth:`Block.mlp_half` the identity);
``"parallel_scaling"`` is ViT-22B's block exactly (sec. 2, timm ``ParallelScalingBlock``): one norm and one branch
scale for both, ``x + DropPath(ls1(mixer(norm1(x)) + mlp(norm1(x))))`` (no ``norm2``/``ls2``).  ``"res_post"`` is
Swin V2's residual post-norm ("Swin Transformer V2: Scaling Up Capacity and Resolution", Liu et al., CVPR 2022,
sec. 3.2): each branch reads the raw tokens and is normalised before it joins the residual,
``x + DropPath(ls1(norm1(mixer(x))))`` then ``x + DropPath(ls2(norm2(mlp(x))))``.  Optional
``conv_units`` (LipsFormer's depthwise-conv residual units) run before the attention half.  An optional
``local_mixer`` (XCiT's local patch interaction, El-Nouby et al., NeurIPS 2021, sec. 3.3) is a third residual
branch between attention and MLP, ``x + DropPath(ls3(local_mp(norm3(x))))``, part of the attention half.
``"prefix_xcit"`` is XCiT's class-attention block (timm ``xcit.ClassAttentionBlock``): as ``"prefix"``, except
that the attention residual adds the normalised patch tokens to the patch tokens, the MLP residual starts from
``norm2`` of the class token (of every token with ``tokens_norm``) and also adds the patch tokens to themselves.
Without autograd the sums are written into the branch outputs (:mod:`vitlab.layers.inplace`).

The mixer and the channel mixer are built by the caller (any :data:`~vitlab.layers.MIXERS` mixer,
any channel mixer taking ``(x, layout)``); every other part is named here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from vitlab.layers import DWConvUnit, DropPath, FeatScale, create_norm, create_shortcut
from vitlab.layers.inplace import residual_add
from vitlab.layers.layout import TokenLayout

__all__ = ["Block", "ParallelBranch", "WIRINGS", "drop_path_rates"]

WIRINGS = ("pre", "post", "end", "prefix", "parallel", "prefix_xcit", "parallel_scaling", "res_post")


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """Stochastic depth per block (Huang et al., ECCV 2016): ``rate * i / (depth - 1)`` for block ``i`` of
    ``depth``, the linear rule of DeiT, Swin and PVT; plain floats, so models build on 'meta'."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


Mixers = Union[nn.Module, Sequence[nn.Module]]


class ParallelBranch(nn.Module):
    """One of the parallel branches of a block, ``drop_path(ls(fn(norm(x))))`` with ``fn`` held as ``attn`` or
    ``mlp`` ("Three things everyone should know about Vision Transformers", Touvron et al., ECCV 2022, sec. 3:
    ``x + sum_j attn_j(x)`` then ``x + sum_j mlp_j(x)``; names as timm's ``ParallelThingsBlock``)."""

    def __init__(self, dim: int, role: str, fn: nn.Module, norm: str, eps: float, scale: str,
                 init: Optional[float], depth: int, drop_path: float):
        super().__init__()
        self.role = role
        self.norm = create_norm(norm, dim, eps=eps)
        setattr(self, role, fn)
        self.ls = create_shortcut(scale, dim, init, depth=depth)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.drop_path(self.ls(getattr(self, self.role)(self.norm(x), layout)))


class Block(nn.Module):
    """One block: ``attn_half(x, layout)`` then ``mlp_half(x, layout)``; see the module docstring.

    Args: ``dim``; ``mixer`` and ``mlp`` (modules); ``norm`` / ``norm_eps``; ``wiring``;
    ``branch_scale`` (``plain`` | ``weighted`` | ``layerscale``) with ``branch_scale_init`` and
    ``total_depth`` (the weighted shortcut's default 1/L); ``featscale``; ``conv_units`` (their
    ``alpha`` is ``branch_scale_init`` or ``1/total_depth``); ``drop_path``; ``local_mixer`` (a module called as
    ``(x, layout)``, held as ``local_mp`` with ``norm3``, ``ls3``); ``tokens_norm`` (``"prefix_xcit"`` only).
    Attribute names (``norm1, attn, ls1, norm2, mlp, ls2``) are timm's.  Lists of mixers and MLPs make a block
    of parallel branches (:class:`ParallelBranch`, held as ``attns`` and ``ffns``, timm's names).
    """

    def __init__(self, dim: int, mixer: Mixers, mlp: Mixers, norm: str = "layernorm", norm_eps: float = 1e-6,
                 wiring: str = "pre", branch_scale: str = "plain", branch_scale_init: Optional[float] = None,
                 total_depth: int = 1, featscale: bool = False, conv_units: bool = False, drop_path: float = 0.0,
                 local_mixer: Optional[nn.Module] = None, tokens_norm: bool = False):
        super().__init__()
        if wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {WIRINGS}, got {wiring!r}")
        if wiring == "parallel_scaling" and mlp is None:
            raise ValueError("wiring 'parallel_scaling' runs the MLP beside the attention; this block has no MLP")
        if ((local_mixer is not None and wiring not in ("pre", "post", "res_post"))
                or (tokens_norm and wiring != "prefix_xcit")):
            raise ValueError(f"local_mixer needs wiring 'pre' or 'post' (or 'res_post') and tokens_norm wiring "
                             f"'prefix_xcit'; got wiring {wiring!r}")
        self.wiring, self.tokens_norm, self.local_mp = wiring, tokens_norm, None
        if isinstance(mixer, (list, tuple)):  # parallel branches: their own norms and scales, no single halves
            if wiring != "pre" or featscale or conv_units or local_mixer is not None or len(mixer) != len(mlp):
                raise ValueError(f"parallel branches ({len(mixer)} mixers, {len(mlp)} MLPs) need wiring 'pre', "
                                 f"equal counts and no featscale/conv_units/local_mixer; got wiring {wiring!r}")
            side = dict(norm=norm, eps=norm_eps, scale=branch_scale, init=branch_scale_init, depth=total_depth,
                        drop_path=drop_path)
            self.attns = nn.ModuleList([ParallelBranch(dim, "attn", m, **side) for m in mixer])
            self.ffns = nn.ModuleList([ParallelBranch(dim, "mlp", m, **side) for m in mlp])
            self.conv_units = self.featscale = None
            return
        alpha = 1.0 / total_depth if branch_scale_init is None else branch_scale_init
        self.conv_units = nn.ModuleList([DWConvUnit(dim, pointwise=True, alpha=alpha, drop_path=drop_path),
                                         DWConvUnit(dim, pointwise=False, alpha=alpha, drop_path=drop_path)
                                         ]) if conv_units else None
        self.norm1 = create_norm(norm, dim, eps=norm_eps) if wiring != "end" else nn.Identity()
        self.attn = mixer
        self.featscale = FeatScale(dim) if featscale else None
        self.ls1 = create_shortcut(branch_scale, dim, branch_scale_init, depth=total_depth)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if local_mixer is not None:  # XCiT: tokens meet their neighbours between attention and MLP
            self.norm3 = create_norm(norm, dim, eps=norm_eps)
            self.local_mp = local_mixer
            self.ls3 = create_shortcut(branch_scale, dim, branch_scale_init, depth=total_depth)
            self.drop_path3 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = mlp  # None: an attention-only block (ViViT's factorised self-attention, spatial half)
        if (mlp is not None or wiring == "end") and wiring != "parallel_scaling":  # ViT-22B: one norm, one scale
            self.norm2 = create_norm(norm, dim, eps=norm_eps)
            self.ls2 = create_shortcut(branch_scale, dim, branch_scale_init, depth=total_depth)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def post_norm(self) -> bool:
        """Branches read un-normalised tokens (``post`` and ``end`` wiring)."""
        return self.wiring in ("post", "end")

    @property
    def raw_branches(self) -> bool:
        """Branches read the un-normalised tokens (``post``, ``end`` and ``res_post`` wiring)."""
        return self.post_norm or self.wiring == "res_post"

    @property
    def num_parallel(self) -> int:
        """Parallel attention (and MLP) branches: 1 unless built with lists of mixers."""
        return len(self.attns) if hasattr(self, "attns") else 1

    @property
    def fused_halves(self) -> bool:
        """True for the parallel wirings: both branches read the block's input, so there is no map between an
        attention half and an MLP half (``attn_half`` is the whole block)."""
        return self.wiring in ("parallel", "parallel_scaling")

    def attn_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if hasattr(self, "attns"):
            return x + sum(b(x, layout) for b in self.attns)
        for unit in self.conv_units if self.conv_units is not None else ():
            x = unit(x, layout.hw, layout.num_prefix)
        if self.wiring == "parallel":
            y = self.attn(self.norm1(x), layout)
            y = self.featscale(y) if self.featscale is not None else y
            return x + self.drop_path1(self.ls1(y)) + self.drop_path2(self.ls2(self.mlp(self.norm2(x), layout)))
        if self.wiring == "parallel_scaling":
            xn = self.norm1(x)
            y = self.attn(xn, layout)
            y = self.featscale(y) if self.featscale is not None else y
            return x + self.drop_path1(self.ls1(y + self.mlp(xn, layout)))
        if self.wiring == "prefix":
            p = layout.num_prefix
            cls = x[:, :p] + self.drop_path1(self.ls1(self.attn(self.norm1(x), layout)))
            return torch.cat([cls, x[:, p:]], dim=1)
        if self.wiring == "prefix_xcit":  # the patch tokens' branch is their normalised value
            xn = self.norm1(x)
            return x + self.drop_path1(self.ls1(torch.cat([self.attn(xn, layout), xn[:, layout.num_prefix:]], 1)))
        y = self.attn(x if self.raw_branches else self.norm1(x), layout)
        if self.featscale is not None:
            y = self.featscale(y)
        res_norm = self.norm1 if self.wiring == "res_post" else None  # normalises the branch output (a producer too)
        y = y if res_norm is None else res_norm(y)
        x = residual_add(x, self.drop_path1(self.ls1(y)), self.attn, self.featscale, res_norm, self.ls1,
                         self.drop_path1)
        x = self.norm1(x) if self.post_norm else x
        return x if self.local_mp is None else self._local_half(x, layout)

    def _local_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The third branch (XCiT's LPI): ``x + DropPath(ls3(local_mp(norm3(x))))`` (post-norm: norm after the sum;
        res_post: ``norm3`` on the branch output)."""
        y = self.local_mp(x if self.raw_branches else self.norm3(x), layout)
        y = self.drop_path3(self.ls3(self.norm3(y) if self.wiring == "res_post" else y))
        return self.norm3(x + y) if self.post_norm else x + y

    def mlp_half(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if hasattr(self, "ffns"):
            return x + sum(b(x, layout) for b in self.ffns)
        if self.mlp is None:
            return x
        if self.fused_halves:  # the MLP branch ran beside the attention in attn_half
            return x
        if self.wiring == "prefix":
            p = layout.num_prefix
            cls = x[:, :p]
            cls = cls + self.drop_path2(self.ls2(self.mlp(self.norm2(cls))))
            return torch.cat([cls, x[:, p:]], dim=1)
        if self.wiring == "prefix_xcit":  # the residual is the normalised class token; patches are doubled
            p = layout.num_prefix
            x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :p]), x[:, p:]], dim=1)
            return x + self.drop_path2(torch.cat([self.ls2(self.mlp(x[:, :p])), x[:, p:]], dim=1))
        y = self.mlp(x if self.raw_branches else self.norm2(x), layout)
        y = self.drop_path2(self.ls2(self.norm2(y) if self.wiring == "res_post" else y))
        x = residual_add(x, y, self.mlp, self.norm2 if self.wiring == "res_post" else None, self.ls2, self.drop_path2)
        return self.norm2(x) if self.post_norm else x

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.mlp_half(self.attn_half(x, layout), layout)
