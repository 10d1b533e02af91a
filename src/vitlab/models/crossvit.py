"""CrossViT, built from vitlab parts.

"CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification" (Chen, Fan & Panda, ICCV
2021).  Two token streams (sec. 3.2): a *small-patch* branch (12-pixel patches of the 240-pixel image) and a
*large-patch* branch (16-pixel patches of the image resized to 224), each a ViT with its own class token and
position table.  A multi-scale block runs ``N`` blocks on the small branch and ``M`` on the large one, then fuses
them by cross-attention (sec. 3.3, Eqs. 5-7): each branch's class token, projected to the other branch's width by
``f`` (LayerNorm, GELU, Linear), is the only query over itself and the other branch's patch tokens,

    y_cls = f(x_cls) + MCA(LN([f(x_cls) || x_patch']))        keys and values: f(x_cls) and x_patch'
    z     = [g(y_cls) || x_patch]                              g = LayerNorm, GELU, Linear back

so the fusion is linear in the token count.  The classifier averages the logits of both branches' heads, each on
its class token after a final norm.  The dagger models (sec. 4.1) replace each patch projection by three
convolutions (7x7/4, 3x3, 3x3 with ReLUs).

In vitlab the branches run the one :class:`~vitlab.models.block.Block` with any part (``mixer``, ``core``,
``modifiers``, ``attn_position``, ``mixer_kwargs``, ``norm`` (every norm), ``branch_scale`` / ``shortcut_init``,
``featscale``, ``wiring``, ``init``); the fusion is the same ``Block`` with the ``prefix`` wiring and no MLP around
attention built from the parts ``separate`` (projection) and ``class_query`` (grouping), as CaiT's class attention.  Its
mixer is ``fusion_mixer`` (``softmax``, or ``cosine`` when ``mixer='cosine'``, as CaiT's ``ca_mixer``): a one-query
attention takes no token mixer such as pooling.  ``depth`` is timm's: one ``(N, M, L)`` per multi-scale block, ``L = 0``
one cross-attention block (every paper model), ``L > 0`` that many in turn between ``f`` and ``g``, each keeping the
other branch's patches as keys (the official code's sequence gives the later blocks the class token alone).  Any input
size runs: each branch resizes the image to its own size (bicubic), as the official code.  Branch sides
(``int(img_size * scale)``) need not divide by the patch: grids are floored as timm's; timm's position tables have
``side // p * side // p`` rows (337 for 325 tokens at 224, so it cannot run there), vitlab's the floored grid's.
State-dict keys are timm's ``CrossVit`` except the fusion's ``attn.{q,k,v}`` (timm: ``wq, wk, wv``), renamed by
:mod:`vitlab.interop.timm_crossvit`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.models.base import Intermediate, VitlabModel, feature_take_indices, make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["CrossVit", "MultiScaleBlock", "CrossPatchEmbed", "scale_image"]

Depth = Sequence[Sequence[int]]


def scale_image(x: torch.Tensor, size: Tuple[int, int], crop: bool = False) -> torch.Tensor:
    """``x`` at ``size``: unchanged if it is, else a centre crop (``crop`` and large enough) or bicubic resize."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if crop and size[0] <= h and size[1] <= w:
        top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
        return x[:, :, top:top + size[0], left:left + size[1]]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def _dagger_side(side: int, patch_size: int) -> int:
    """Tokens per side of the dagger stem on a ``side``-pixel image (7x7/4, then 3x3/3 or twice 3x3/2)."""
    side = (side - 1) // 4 + 1
    return (side - 3) // 3 + 1 if patch_size == 12 else ((side - 1) // 2) // 2 + 1


class CrossPatchEmbed(nn.Module):
    """One branch's patch projection (names as timm's ``crossvit.PatchEmbed``): a ``patch x patch`` conv, or with
    ``multi_conv`` the dagger models' three convs (Chen et al., 2021, sec. 4.1; for 12- and 16-pixel patches).
    The grid is floored as timm's (``img_size // patch_size``): the conv drops a last partial patch."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, multi_conv: bool = False):
        super().__init__()
        if img_size < patch_size:
            raise ValueError(f"a CrossViT branch needs a side of at least its patch, got {img_size} and {patch_size}")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size,) * 2
        if not multi_conv:
            self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
            return
        if patch_size not in (12, 16):
            raise ValueError(f"multi_conv (the dagger stem) takes patch sizes 12 or 16, got {patch_size}")
        if (n := _dagger_side(img_size, patch_size)) != img_size // patch_size:  # timm builds it, cannot run it
            raise ValueError(f"multi_conv (the dagger stem) gives a {img_size}-pixel branch {n} tokens a side, not the "
                             f"floored grid's {img_size // patch_size}; expected a side of "
                             f"{'12k + 0..8' if patch_size == 12 else '16k'} pixels")
        mid = (3, 3, 0) if patch_size == 12 else (3, 2, 1)  # kernel, stride, padding of the second conv
        self.proj = nn.Sequential(nn.Conv2d(in_chans, dim // 4, 7, stride=4, padding=3), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim // 4, dim // 2, mid[0], stride=mid[1], padding=mid[2]),
                                  nn.ReLU(inplace=True),
                                  nn.Conv2d(dim // 2, dim, 3, stride=1 if patch_size == 12 else 2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _projection(norm: str, eps: float, dim_in: int, dim_out: int) -> nn.Sequential:
    """``f`` / ``g`` of Eqs. 5-7: norm, GELU, Linear (timm's ``projs`` / ``revert_projs``)."""
    return nn.Sequential(create_norm(norm, dim_in, eps=eps), nn.GELU(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """One multi-scale block (Chen et al., 2021, sec. 3.3): ``blocks[b]`` on branch ``b``, then each branch's class
    token is fused with the next branch's patches: ``projs[b]`` (f), ``fusion[b]`` (cross-attention Block(s)),
    ``revert_projs[b]`` (g).  ``layouts[b]`` is branch ``b``'s :class:`TokenLayout` (its grid, one class token)."""

    def __init__(self, dims: Sequence[int], layouts: Sequence[TokenLayout], depth: Sequence[int],
                 branch_block, fusion_block, norm: str, eps: float):
        super().__init__()
        n = len(dims)
        self.layouts = list(layouts)
        self.blocks = nn.ModuleList([nn.ModuleList([branch_block(b, j) for j in range(depth[b])]) for b in range(n)])
        self.projs = nn.ModuleList([_projection(norm, eps, dims[b], dims[(b + 1) % n]) for b in range(n)])
        many = depth[-1]  # 0: one fusion Block (timm's key layout without an index)
        self.fusion = nn.ModuleList([fusion_block((b + 1) % n) if many == 0 else
                                     nn.ModuleList([fusion_block((b + 1) % n) for _ in range(many)])
                                     for b in range(n)])
        self.revert_projs = nn.ModuleList([_projection(norm, eps, dims[(b + 1) % n], dims[b]) for b in range(n)])

    def fuse(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Eqs. 5-7 on the branches' tokens ``xs[b]`` ``(B, 1 + N_b, C_b)``: new class tokens, patches kept."""
        n, out = len(xs), []
        for b, (proj, fusion, revert) in enumerate(zip(self.projs, self.fusion, self.revert_projs)):
            other = (b + 1) % n
            cls = proj(xs[b][:, :1])
            for blk in (fusion if isinstance(fusion, nn.ModuleList) else (fusion,)):
                cls = blk(torch.cat([cls, xs[other][:, 1:]], dim=1), self.layouts[other])[:, :1]
            out.append(torch.cat([revert(cls), xs[b][:, 1:]], dim=1))
        return out

    def forward(self, xs: List[torch.Tensor], run=None) -> List[torch.Tensor]:
        """``run(blk, x, layout)`` runs one branch block (the model's, which may checkpoint it)."""
        run = run or (lambda blk, x, layout: blk(x, layout))
        outs = []
        for b, blocks in enumerate(self.blocks):
            x = xs[b]
            for blk in blocks:
                x = run(blk, x, self.layouts[b])
            outs.append(x)
        return self.fuse(outs)


def _check_sizes(patch_size, embed_dim, num_heads, img_scale, mlp_ratio, depth) -> None:
    n = len(patch_size)
    if n < 2 or not len(embed_dim) == len(num_heads) == len(img_scale) == n or len(mlp_ratio) < n:
        raise ValueError(f"CrossViT needs one patch_size, embed_dim, num_heads, img_scale and mlp_ratio per branch "
                         f"(at least 2); got patch_size={tuple(patch_size)}, embed_dim={tuple(embed_dim)}, "
                         f"num_heads={tuple(num_heads)}, img_scale={tuple(img_scale)}, mlp_ratio={tuple(mlp_ratio)}")
    bad = [tuple(d) for d in depth if len(d) != n + 1 or min(d[:n]) < 1 or d[n] < 0]
    if not depth or bad:
        raise ValueError(f"depth needs one (branch depths >= 1 ..., fusion depth >= 0) per multi-scale block, "
                         f"{n + 1} entries each; got {bad or list(depth)}")


def _fusion_spec(fusion_mixer: Optional[str], spec: MixerSpec) -> MixerSpec:
    """The fusion's attention: ``fusion_mixer``, default ``cosine`` (with the user's ``tau``) when the branches use
    the cosine mixer, else ``softmax`` (CaiT's rule for its class attention)."""
    name = fusion_mixer or ("cosine" if spec.mixer == "cosine" else "softmax")
    if not MixerSpec(name).attention:
        raise ValueError(f"fusion_mixer must be an attention mixer (softmax, cosine, ...), got {name!r}: the fusion's "
                         "one query attends over the other branch's tokens")
    return MixerSpec(name, None, (), {k: v for k, v in spec.kwargs.items() if k == "tau"} if name == "cosine" else {})


class CrossVit(VitlabModel):
    """CrossViT (Chen et al., ICCV 2021) whose parts are arguments; see the module docstring.

    Sizes (timm's names): ``img_size`` (the first branch's side), ``img_scale`` (each branch's side is
    ``int(img_size * scale)``), ``patch_size``, ``embed_dim``, ``num_heads`` and ``mlp_ratio`` per branch (timm keeps
    a third, unused ratio), ``depth`` (one ``(N, M, L)`` per multi-scale block), ``multi_conv`` (dagger stem),
    ``crop_scale`` (centre-crop instead of resizing where the image is larger).  ``fusion_heads`` /
    ``fusion_head_dim`` override the cross-attention's heads (default: the attended branch's) and head width.
    """

    _global_pools = ("token", "avg")

    def __init__(self, img_size: int = 240, img_scale: Sequence[float] = (1.0, 224 / 240),
                 patch_size: Sequence[int] = (12, 16), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (192, 384), depth: Depth = ((1, 4, 0),) * 3,
                 num_heads: Sequence[int] = (6, 6), mlp_ratio: Sequence[float] = (4.0, 4.0, 1.0),
                 multi_conv: bool = False, crop_scale: bool = False, qkv_bias: bool = True,
                 fusion_heads: Optional[int] = None, fusion_head_dim: Optional[int] = None,
                 mixer: str = "softmax", core: Optional[str] = None, modifiers: Sequence[str] = (),
                 attn_position: Sequence[Any] = (), mixer_kwargs: Optional[Dict[str, Any]] = None,
                 fusion_mixer: Optional[str] = None, norm: str = "layernorm", norm_eps: float = 1e-6,
                 branch_scale: Optional[str] = None, shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, wiring: str = "pre", init: str = "trunc_normal", global_pool: str = "token",
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, architecture: str = "crossvit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        img_size = img_size if isinstance(img_size, int) else img_size[0]
        _check_sizes(patch_size, embed_dim, num_heads, img_scale, mlp_ratio, depth)
        self._set_global_pool(global_pool)
        self.num_classes, self.in_chans, self.crop_scale = num_classes, in_chans, crop_scale
        self.num_branches, self.embed_dim = len(patch_size), tuple(embed_dim)
        self.num_features = self.head_hidden_size = sum(embed_dim)
        self.img_scale, self.patch_size = tuple(img_scale), tuple(patch_size)
        self.img_size_scaled = [(int(img_size * s),) * 2 for s in img_scale]  # timm's rounding
        self.patch_embed = nn.ModuleList([CrossPatchEmbed(s[0], p, in_chans, d, multi_conv) for s, p, d in
                                          zip(self.img_size_scaled, patch_size, embed_dim)])
        self.layouts = layouts = [TokenLayout(pe.grid_size, 1) for pe in self.patch_embed]
        for b, (d, layout) in enumerate(zip(embed_dim, layouts)):
            setattr(self, f"pos_embed_{b}", nn.Parameter(torch.zeros(1, layout.num_tokens, d)))
            setattr(self, f"cls_token_{b}", nn.Parameter(torch.zeros(1, 1, d)))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        common = dict(norm=norm, norm_eps=norm_eps, branch_scale=branch_scale or shortcut,
                      branch_scale_init=shortcut_init, total_depth=sum(max(d[:-1]) + d[-1] for d in depth))
        sizes = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, fusion_heads=fusion_heads,
                     fusion_head_dim=fusion_head_dim, drop=proj_drop_rate)
        attention = dict(qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        self.blocks = self._build_blocks(depth, sizes, spec, _fusion_spec(fusion_mixer, spec), attention,
                                         dict(common, wiring=wiring, featscale=featscale), common, drop_path_rate)
        self.norm = nn.ModuleList([create_norm(norm, d, eps=norm_eps) for d in embed_dim])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.ModuleList([nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
                                   for d in embed_dim])
        self.init_name = init
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith(("pos_embed_", "cls_token_")):
                    nn.init.trunc_normal_(p, std=0.02)
            init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img_size, num_classes, in_chans)

    def _build_blocks(self, depth: Depth, sizes: Dict[str, Any], spec: MixerSpec, fusion_spec: MixerSpec,
                      attention: Dict[str, Any], branch_kw: Dict[str, Any], fusion_kw: Dict[str, Any],
                      drop_path_rate: float) -> nn.ModuleList:
        """The multi-scale blocks: branch Blocks with the user's parts (``branch_kw``), fusion Blocks with the
        ``prefix`` wiring and class-token queries (``fusion_kw``); stochastic depth by the official rule (block ``j``
        of every branch at rate ``j`` of the multi-scale block's slice, the fusion at the slice's last)."""
        dims, layouts = sizes["embed_dim"], self.layouts
        dpr, k, blocks = drop_path_rates(drop_path_rate, branch_kw["total_depth"]), 0, []
        for cfg in depth:
            rates = dpr[k:k + max(cfg[:-1]) + cfg[-1]]
            k += len(rates)

            def branch_block(b, j, rates=rates):
                mlp = Mlp(dims[b], int(dims[b] * sizes["mlp_ratio"][b]), drop=sizes["drop"])
                attn = spec.build(dims[b], sizes["num_heads"][b], layouts[b], **attention)
                return Block(dims[b], attn, mlp, drop_path=rates[j], **branch_kw)

            def fusion_block(b, rates=rates):  # the class token of the other branch asks branch b's tokens
                heads = sizes["fusion_heads"] or sizes["num_heads"][b]
                attn = fusion_spec.build(dims[b], heads, layouts[b], projection="separate", grouping="class_query",
                                         head_dim=sizes["fusion_head_dim"], **attention)
                return Block(dims[b], attn, None, wiring="prefix", drop_path=rates[-1], **fusion_kw)

            blocks.append(MultiScaleBlock(dims, layouts, cfg, branch_block, fusion_block, fusion_kw["norm"],
                                          fusion_kw["norm_eps"]))
        return nn.ModuleList(blocks)

    @property
    def pos_embed_grids(self) -> List[Tuple[int, int]]:
        """The patch grid of each ``pos_embed_{b}`` (the one resizer fits a checkpoint's tables to them)."""
        return [pe.grid_size for pe in self.patch_embed]

    # -- running --------------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Image -> each branch's tokens ``(B, 1 + N_b, C_b)``: its resized image patchified, the class token
        joined, the position table added."""
        self.check_input(x)
        xs = []
        for b, pe in enumerate(self.patch_embed):
            tokens = pe(scale_image(x, self.img_size_scaled[b], self.crop_scale))
            cls = getattr(self, f"cls_token_{b}").expand(x.shape[0], -1, -1)
            xs.append(self.pos_drop(torch.cat([cls, tokens], dim=1) + getattr(self, f"pos_embed_{b}")))
        return xs

    def _run_block(self, blk: nn.Module, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self._block(blk, x, layout)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Image -> the normalised tokens of every branch (a list, as timm's)."""
        xs = self._embed(x)
        for blk in self.blocks:
            xs = blk(xs, self._run_block)
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def forward_head(self, xs: Union[List[torch.Tensor], Tuple[torch.Tensor, ...]], pre_logits: bool = False
                     ) -> torch.Tensor:
        """The mean of the branches' logits (Chen et al., 2021, sec. 3.2); ``pre_logits``: the pooled features of
        all branches concatenated ``(B, sum C_b)``."""
        pooled = [self.head_drop(t[:, 1:].mean(dim=1) if self.global_pool == "avg" else t[:, 0]) for t in xs]
        if pre_logits or isinstance(self.head[0], nn.Identity):
            return torch.cat(pooled, dim=1)
        return torch.stack([head(t) for head, t in zip(self.head, pooled)]).mean(dim=0)

    # -- the contract ---------------------------------------------------------------------------------------------
    def _feature_info(self) -> List[Dict[str, Any]]:
        """timm's taps, branch-major: tap ``b * D + i`` is branch ``b``'s patch tokens after multi-scale block ``i``."""
        return [dict(num_chs=self.embed_dim[b], reduction=round(self.patch_size[b] / self.img_scale[b]),
                     module=f"blocks.{i}") for b in range(self.num_branches) for i in range(len(self.blocks))]

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              stop_early: bool = False):
        """timm's ``CrossVit.forward_intermediates``: taps ordered branch-major (see :meth:`_feature_info`),
        patch tokens only, ``norm`` applying the branch's final norm; the final features are the list of
        normalised branch tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be one of ('NCHW', 'NLC'), got {output_fmt!r}")
        depth = len(self.blocks)
        take, _ = feature_take_indices(self.num_branches * depth, indices)
        last = max(i % depth for i in take)
        xs, taps = self._embed(x), {}
        for i, blk in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
            xs = blk(xs, self._run_block)
            for b in range(self.num_branches):
                if b * depth + i in take:
                    y = (self.norm[b](xs[b]) if norm else xs[b])[:, 1:]
                    taps[b * depth + i] = (y if output_fmt == "NLC" else
                                           TokenLayout(self.patch_embed[b].grid_size).to_map(y).contiguous())
        out = [taps[i] for i in sorted(taps)]
        if intermediates_only:
            return out
        return [n(t) for n, t in zip(self.norm, xs)], out

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's: keep the multi-scale blocks up to the last tap of any branch."""
        depth = len(self.blocks)
        take, _ = feature_take_indices(self.num_branches * depth, indices)
        self.blocks = self.blocks[:max(i % depth for i in take) + 1]
        if prune_norm:
            self.norm = nn.ModuleList([nn.Identity() for _ in range(self.num_branches)])
        if prune_head:
            self.reset_classifier(0)
        return take

    def _set_global_pool(self, global_pool: str) -> None:
        super()._set_global_pool(global_pool)
        self.global_pool = global_pool

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head per branch (timm's ``head.{b}``) for ``num_classes`` (0: none)."""
        if global_pool is not None:
            self._set_global_pool(global_pool)
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.head = nn.ModuleList([nn.Linear(d, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                                   else nn.Identity() for d in self.embed_dim]).train(self.training)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """Per branch (branch-major, ``stage`` = branch): the embedding, every block's attention and MLP halves
        (one ``block`` entry for parallel wiring), the class token after each fusion (``fusion``: the map is
        unchanged, ``prefix`` holds the new class token) and the final norm."""
        xs, per = self._embed(x), [[] for _ in range(self.num_branches)]

        def entry(b, name, kind, t):
            per[b].append(Intermediate(name, kind, self.layouts[b].to_map(t), t[:, :1], b))

        for b, t in enumerate(xs):
            entry(b, f"patch_embed.{b}", "embed", t)
        for i, msb in enumerate(self.blocks):
            for b, blocks in enumerate(msb.blocks):
                for j, blk in enumerate(blocks):
                    name, t = f"blocks.{i}.blocks.{b}.{j}", blk.attn_half(xs[b], msb.layouts[b])
                    if blk.fused_halves:
                        xs[b] = t
                        entry(b, name, "block", t)
                        continue
                    entry(b, f"{name}.attn", "attn", t)
                    xs[b] = blk.mlp_half(t, msb.layouts[b])
                    entry(b, f"{name}.mlp", "mlp", xs[b])
            xs = msb.fuse(xs)
            for b, t in enumerate(xs):
                entry(b, f"blocks.{i}.fusion.{b}", "fusion", t)
        for b, t in enumerate(xs):
            entry(b, f"norm.{b}", "norm", self.norm[b](t))
        return [e for branch in per for e in branch]


# -- registered recipes: timm's sizes (= the official IBM/CrossViT code's; timm renames *_224 -> *_240) ------------
def _sizes(dims, depth, heads, ratio, dagger=False, img=240):
    return dict(img_size=img, img_scale=(1.0, (224 if img == 240 else 384) / img), patch_size=(12, 16),
                embed_dim=dims, depth=((1, depth, 0),) * 3, num_heads=(heads, heads), mlp_ratio=(ratio, ratio, 1.0),
                multi_conv=dagger)


_SIZES = {
    "crossvit_tiny_240": ("Ti", _sizes((96, 192), 4, 3, 4.0)),
    "crossvit_small_240": ("S", _sizes((192, 384), 4, 6, 4.0)),
    "crossvit_base_240": ("B", _sizes((384, 768), 4, 12, 4.0)),
    "crossvit_9_240": ("9", _sizes((128, 256), 3, 4, 3.0)),
    "crossvit_15_240": ("15", _sizes((192, 384), 5, 6, 3.0)),
    "crossvit_18_240": ("18", _sizes((224, 448), 6, 7, 3.0)),
    "crossvit_9_dagger_240": ("9\u2020", _sizes((128, 256), 3, 4, 3.0, True)),
    "crossvit_15_dagger_240": ("15\u2020", _sizes((192, 384), 5, 6, 3.0, True)),
    "crossvit_18_dagger_240": ("18\u2020", _sizes((224, 448), 6, 7, 3.0, True)),
    "crossvit_15_dagger_408": ("15\u2020 at 384", _sizes((192, 384), 5, 6, 3.0, True, 408)),
    "crossvit_18_dagger_408": ("18\u2020 at 384", _sizes((224, 448), 6, 7, 3.0, True, 408)),
}
for _name, (_label, _cfg) in _SIZES.items():
    register_recipe(CrossVit, _name, _cfg, f"CrossViT-{_label} (Chen et al., ICCV 2021, Table 2): timm's sizes.",
                    crop_pct=1.0 if _cfg["img_size"] == 408 else 0.875)
