"""CSwin Transformer, built from vitlab parts.

"CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows" (Dong
et al., CVPR 2022).  In each block the heads are split in two halves: one attends inside
vertical stripes ``(H, sw)``, the other inside horizontal stripes ``(sw, W)``; the last stage
(and any stage whose stripe covers the map) uses one branch over the whole map.  LePE (a 3x3
depthwise conv on V, run on each stripe separately) is added to every branch's output.

The token mixer is any vitlab mixer: its ``qkv`` / ``proj`` are the block's projections and its
attention core (``softmax``, ``cosine``, ``attnscale``) runs per stripe; a ``focused_linear``
stage ("FLatten Transformer", Han et al., ICCV 2023) attends over the whole map in one branch
(linear cost) plus its depthwise conv and LePE.  LipsFormer's CSwin ("LipsFormer", Qi et al.,
ICLR 2023) is ``norm_layout="end"`` (one norm at the end of each block), ``conv_units=True``,
``lepe_div_heads=True``, a 4x4 stem, 2x2 merges and no final norm.

State-dict layout: ``patch_embed.{proj,norm}``, ``layers.{i}.downsample.{proj,norm}``,
``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, lepe.{b}, norm2, mlp.fc1, mlp.fc2}``,
``norm``, ``head`` (the official code's ``stage1_conv_embed`` / ``stage{i}`` / ``merge{i}`` /
``attns.{b}.get_v`` hold the same tensors).

Attention recording: a two-branch block on a square map records one tensor per forward,
``(B * H/sw, heads, H*sw, H*sw)``: heads ``[0, heads/2)`` hold the vertical stripes (stripe ``s``
of image ``b`` is row ``b * H/sw + s``, tokens in raster order inside the ``H x sw`` stripe),
heads ``[heads/2, heads)`` the horizontal ones (``sw x W``).  A block built on a non-square map
records two tensors (vertical, then horizontal).  Single-branch blocks record
``(B, heads, H*W, H*W)``.  No matrix over the whole map is formed in two-branch stages.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import (DWConvUnit, DropPath, FeatScale, FocusedLinearAttention, Mlp, create_mixer, create_norm,
                           create_shortcut, init_weights)
from vitlab.layers.mixers import MIXERS
from vitlab.layers.residual import ResidualHalves
from vitlab.layers.window import stripe_partition, stripe_reverse
from vitlab.models.base import Intermediate, VitlabModel, make_default_cfg, tokens_to_map
from vitlab.models.swin import LINEAR_MIXER, SwinStage, _per_stage, resize_size_dependent, stage_intermediates
from vitlab.registry import register_model

__all__ = ["CSwinTransformer", "CSwinBlock", "ConvEmbed", "cswin_from_official", "cswin_to_official"]

NORM_LAYOUTS = ("pre", "post", "end")


class ConvEmbed(nn.Module):
    """Strided conv + norm on the token map: CSwin's stem (7x7/4) and merge (3x3/2) blocks
    (Dong et al., 2022); LipsFormer-CSwin uses 4x4/4 and 2x2/2."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int, norm: str = "layernorm",
                 norm_eps: float = 1e-5):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, max(kernel - stride + 1, 0) // 2
        self.proj = nn.Conv2d(in_chans, out_chans, kernel, stride, self.padding)
        self.norm = create_norm(norm, out_chans, eps=norm_eps)

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in hw)  # type: ignore

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None):
        """Image ``(B, C, H, W)`` (stem) or tokens ``(B, H*W, C)`` with ``hw`` (merge) -> ``(tokens, hw)``."""
        if hw is not None:
            x = tokens_to_map(x, hw)
        x = self.proj(x)
        out_hw = tuple(x.shape[-2:])
        return self.norm(x.flatten(2).transpose(1, 2)), out_hw


def _to_stripes(t: torch.Tensor, hw: Tuple[int, int], stripe: Tuple[int, int]) -> torch.Tensor:
    """``(B, h, N, d)`` split heads -> ``(B * nS, h, S, d)`` stripes (channels head-major)."""
    b, nh, n, d = t.shape
    x = t.transpose(1, 2).reshape(b, hw[0], hw[1], nh * d)
    return stripe_partition(x, stripe).reshape(-1, stripe[0] * stripe[1], nh, d).transpose(1, 2)


def _from_stripes(t: torch.Tensor, hw: Tuple[int, int], stripe: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_stripes`, to ``(B, N, h * d)`` tokens."""
    bs, nh, s, d = t.shape
    x = stripe_reverse(t.transpose(1, 2).reshape(bs, s, nh * d), stripe, hw[0], hw[1])
    return x.reshape(x.shape[0], hw[0] * hw[1], nh * d)


class CSwinBlock(ResidualHalves, nn.Module):
    """One CSwin block on ``(B, H*W, C)`` tokens of a fixed ``resolution``.

    ``norm_layout``: ``"pre"`` (CSwin: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``),
    ``"post"`` (norm after each residual add) or ``"end"`` (LipsFormer-CSwin: no norm before the
    branches, one norm ``norm2`` at the end of the block).
    """

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, split_size: int = 7,
                 single_branch: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mixer: str = "softmax", norm: str = "layernorm", norm_eps: float = 1e-5, shortcut: str = "plain",
                 shortcut_init: Optional[float] = None, featscale: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, total_depth: int = 1, norm_layout: str = "pre",
                 conv_units: bool = False, lepe_div_heads: bool = False,
                 mixer_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        if norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout must be one of {NORM_LAYOUTS}, got {norm_layout!r}")
        h, w = self.resolution = tuple(resolution)
        self.num_heads, self.norm_layout, self.lepe_div_heads = num_heads, norm_layout, lepe_div_heads
        self.linear = mixer == LINEAR_MIXER
        if self.linear or single_branch or (split_size >= h and split_size >= w):
            self.stripes = [(h, w)]
        else:
            if num_heads % 2:
                raise ValueError(f"cross-shaped attention splits the heads in two halves; num_heads={num_heads} "
                                 f"is odd (dim {dim}, map {h}x{w})")
            sw = min(split_size, h, w)
            if h % sw or w % sw:
                raise ValueError(f"a {h}x{w} map cannot be cut into stripes of width {sw}; choose split_size "
                                 f"dividing {h} and {w} (e.g. 12 for a 24x24 map at 384 input)")
            self.stripes = [(h, sw), (sw, w)]  # vertical stripes, then horizontal
        nb = len(self.stripes)
        alpha = 1.0 / total_depth if shortcut_init is None else shortcut_init
        self.conv_units = nn.ModuleList([
            DWConvUnit(dim, pointwise=True, alpha=alpha, drop_path=drop_path),
            DWConvUnit(dim, pointwise=False, alpha=alpha, drop_path=drop_path),
        ]) if conv_units else None
        self.norm1 = create_norm(norm, dim, eps=norm_eps) if norm_layout != "end" else nn.Identity()
        self.attn = create_mixer(mixer, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                                 num_tokens=h * w, **(mixer_kwargs or {}))
        if not hasattr(self.attn, "_attend") and not self.linear:
            raise ValueError(f"mixer {mixer!r} has no per-window attention core; CSwin needs a softmax-family "
                             "mixer or focused_linear")
        if getattr(self.attn, "attn_scale", None) is not None and len(self.stripes) == 2 and h != w:
            raise ValueError(f"mixer {mixer!r} (one AttnScale weight per head) needs a square map in a "
                             f"cross-shaped block, got {h}x{w}: the two stripe branches cannot share one call")
        self.lepe = nn.ModuleList([nn.Conv2d(dim // nb, dim // nb, 3, padding=1, groups=dim // nb) for _ in range(nb)])
        self.featscale = FeatScale(dim) if featscale else None
        self.ls1 = create_shortcut(shortcut, dim, shortcut_init, depth=total_depth)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = create_norm(norm, dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = create_shortcut(shortcut, dim, shortcut_init, depth=total_depth)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, stripes={self.stripes}, linear={self.linear}"

    def _lepe(self, conv: nn.Conv2d, v: torch.Tensor, stripe: Tuple[int, int]) -> torch.Tensor:
        """LePE: depthwise 3x3 conv of V on each stripe (zero-padded at the stripe border)."""
        bs, nh, s, d = v.shape
        fm = v.transpose(2, 3).reshape(bs, nh * d, stripe[0], stripe[1])
        return conv(fm).reshape(bs, nh, d, s).transpose(2, 3)

    def _linear_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Focused linear attention on the whole map (same math as FocusedLinearAttention.forward)."""
        attn: FocusedLinearAttention = self.attn  # type: ignore[assignment]
        if attn.recording:
            probs = attn.implied_attention(q, k)
            attn._record(probs)
            out = probs @ v
        else:
            out = attn.linear_attend(q, k, v)
        return out + attn._dwc(v, self.resolution, 0)

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-shaped window attention of ``(B, H*W, C)`` tokens (output projected).

        On a square map the vertical and horizontal stripes have the same shape, so both
        branches run as one attention call over all heads (heads ``[0, h/2)`` in vertical
        stripes, ``[h/2, h)`` in horizontal ones); per-head parts (AttnScale) see every head."""
        q, k, v = self.attn._features(x) if self.linear else self.attn._qkv(x)
        hb = self.num_heads // len(self.stripes)
        parts = [[_to_stripes(t[:, i * hb:(i + 1) * hb], self.resolution, stripe) for t in (q, k, v)]
                 for i, stripe in enumerate(self.stripes)]
        if self.linear:
            outs = [self._linear_core(*parts[0])]
        elif all(p[0].shape == parts[0][0].shape for p in parts):
            qs, ks, vs = (torch.cat([p[j] for p in parts], dim=1) for j in range(3))
            outs = list(self.attn._attend(qs, ks, vs, None).split(hb, dim=1))
        else:  # non-square map: one call per branch
            outs = [self.attn._attend(*p, None) for p in parts]
        merged = []
        for o, p, stripe, conv in zip(outs, parts, self.stripes, self.lepe):
            o = o + self._lepe(conv, p[2], stripe)
            if self.lepe_div_heads:
                o = o / math.sqrt(hb)
            merged.append(_from_stripes(o, self.resolution, stripe))
        y = torch.cat(merged, dim=-1) if len(merged) > 1 else merged[0]
        return self.attn.proj_drop(self.attn.proj(y))

    @property
    def post_norm(self) -> bool:
        """Branches read un-normalised tokens ("post" and "end"; "end" has ``norm1 = Identity``)."""
        return self.norm_layout != "pre"

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.cross_attention(x)

    def _unit_args(self) -> Tuple[Tuple[int, int]]:
        return (self.resolution,)

    # attn_half(x), mlp_half(x), forward(x): vitlab.layers.residual


class CSwinTransformer(VitlabModel):
    """CSwin Transformer whose parts are arguments (Dong et al., CVPR 2022).

    Args beyond the sizes (``embed_dim``, ``depths``, ``num_heads``, ``split_size`` per stage,
    ``mlp_ratio``): ``mixer``, ``attn_type`` (``L``/``S`` per stage as in
    :class:`~vitlab.models.swin.SwinTransformer`), ``norm``, ``norm_eps``, ``shortcut``,
    ``shortcut_init``, ``featscale``, ``init``, ``norm_layout`` (``pre``/``post``/``end``),
    ``conv_units``, ``lepe_div_heads``, ``stem_kernel`` (7: 7x7/4 conv, 4: 4x4/4),
    ``merge_kernel`` (3: 3x3/2, 2: 2x2/2), ``final_norm``, ``mixer_kwargs``.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths: Sequence[int] = (1, 2, 21, 1), num_heads: Sequence[int] = (2, 4, 8, 16),
                 split_size: Sequence[int] = (1, 2, 7, 7), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 mixer: str = "softmax", attn_type: Optional[str] = None, norm: str = "layernorm",
                 norm_eps: float = 1e-5, shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, init: str = "trunc_normal", norm_layout: str = "pre",
                 conv_units: bool = False, lepe_div_heads: bool = False, stem_kernel: int = 7,
                 merge_kernel: int = 3, final_norm: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 mixer_kwargs: Optional[Dict[str, Any]] = None, architecture: str = "cswin",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        n_stages = len(depths)
        if n_stages < 1 or len(num_heads) != n_stages:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if any(d < 1 for d in depths) or embed_dim < 1:
            raise ValueError(f"depths and embed_dim must be positive, got depths={depths}, embed_dim={embed_dim}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if stem_kernel not in (4, 7) or merge_kernel not in (2, 3):
            raise ValueError(f"stem_kernel must be 7 (CSwin) or 4 (LipsFormer) and merge_kernel 3 or 2, "
                             f"got {stem_kernel}, {merge_kernel}")
        MIXERS.get(mixer)
        if attn_type is None:
            attn_type = ("L" if mixer == LINEAR_MIXER else "S") * n_stages
        if not isinstance(attn_type, str) or len(attn_type) != n_stages or set(attn_type) - {"L", "S"}:
            raise ValueError(f"attn_type must be a string of {n_stages} letters 'L' (focused linear, global) or "
                             f"'S' (cross-shaped windows), one per stage, got {attn_type!r}")
        if mixer == LINEAR_MIXER and "S" in attn_type:
            raise ValueError(f"attn_type {attn_type!r} asks for stripe stages ('S') but mixer='focused_linear'; "
                             "pass a softmax-family mixer for the 'S' stages")
        splits = _per_stage(split_size, n_stages, "split_size")
        if isinstance(img_size, (tuple, list)):
            if img_size[0] != img_size[1]:
                raise ValueError(f"CSwinTransformer takes square images, got img_size={img_size}")
            img_size = img_size[0]
        self.img_size = int(img_size)
        self.num_classes, self.in_chans, self.attn_type = num_classes, in_chans, attn_type
        dims = [int(embed_dim * 2 ** i) for i in range(n_stages)]
        self.embed_dim, self.num_features = embed_dim, dims[-1]
        self.patch_embed = ConvEmbed(in_chans, embed_dim, stem_kernel, 4, norm, norm_eps)
        hw = self.grid_size = self.patch_embed.out_size((self.img_size, self.img_size))
        if min(hw) < 1:
            raise ValueError(f"img_size {img_size} is too small for a stride-4 stem")
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, k = [], 0
        for i in range(n_stages):
            down = None
            if i > 0:
                down = ConvEmbed(dims[i - 1], dims[i], merge_kernel, 2, norm, norm_eps)
                hw = down.out_size(hw)
                if min(hw) < 1:
                    raise ValueError(f"img_size {img_size} is too small for {n_stages} stages")
            stage_mixer = LINEAR_MIXER if attn_type[i] == "L" else mixer
            blocks = [CSwinBlock(dims[i], hw, num_heads[i], split_size=splits[i], single_branch=i == n_stages - 1,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, mixer=stage_mixer, norm=norm,
                                 norm_eps=norm_eps, shortcut=shortcut, shortcut_init=shortcut_init,
                                 featscale=featscale, drop=drop_rate, attn_drop=attn_drop_rate,
                                 drop_path=dpr[k + j], total_depth=total, norm_layout=norm_layout,
                                 conv_units=conv_units, lepe_div_heads=lepe_div_heads, mixer_kwargs=mixer_kwargs)
                      for j in range(depths[i])]
            k += depths[i]
            stages.append(SwinStage(down, blocks))
        self.layers = nn.ModuleList(stages)
        self.final_resolution = hw
        self.norm = create_norm(norm, self.num_features, eps=norm_eps) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        init_weights(self, init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, self.img_size, num_classes, in_chans,
                                                           crop_pct=0.9)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input image size {x.shape[-2]}x{x.shape[-1]} does not match the model's img_size "
                             f"{self.img_size}x{self.img_size}; create the model with img_size={x.shape[-1]}")

    def _embed(self, x: torch.Tensor):
        self.check_input(x)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H/32 * W/32, 8C)`` final tokens (after the final norm, if any)."""
        x, hw = self._embed(x)
        for stage in self.layers:
            x, hw = stage(x, hw)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: torch.Tensor) -> List[Intermediate]:
        """Stem, then per stage the merge (``downsample``) and every block's attention and MLP
        halves, each as a ``(B, C, H, W)`` map."""
        x, hw = self._embed(x)
        embed = Intermediate("patch_embed", "embed", tokens_to_map(x, hw), None, 0)
        return [embed] + stage_intermediates(self.layers, x, hw)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a state dict; focused-linear key position encodings trained at another input
        size are resized by bicubic interpolation of their token grid."""
        return super().load_state_dict(resize_size_dependent(self, state_dict), strict=strict, assign=assign)


# -- the official CSwin repository's state-dict layout ---------------------------------------------
_OFFICIAL_TO_VITLAB = [
    (r"^stage1_conv_embed\.0\.", "patch_embed.proj."),
    (r"^stage1_conv_embed\.2\.", "patch_embed.norm."),
    (r"^merge(\d+)\.conv\.", lambda m: f"layers.{m.group(1)}.downsample.proj."),
    (r"^merge(\d+)\.norm\.", lambda m: f"layers.{m.group(1)}.downsample.norm."),
    (r"^stage(\d+)\.(\d+)\.attns\.(\d+)\.get_v\.",
     lambda m: f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}.lepe.{m.group(3)}."),
    (r"^stage(\d+)\.(\d+)\.(qkv|proj)\.",
     lambda m: f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}.attn.{m.group(3)}."),
    (r"^stage(\d+)\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
]
_VITLAB_TO_OFFICIAL = [
    (r"^patch_embed\.proj\.", "stage1_conv_embed.0."),
    (r"^patch_embed\.norm\.", "stage1_conv_embed.2."),
    (r"^layers\.(\d+)\.downsample\.proj\.", lambda m: f"merge{m.group(1)}.conv."),
    (r"^layers\.(\d+)\.downsample\.norm\.", lambda m: f"merge{m.group(1)}.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.lepe\.(\d+)\.",
     lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}.attns.{m.group(3)}.get_v."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.(qkv|proj)\.",
     lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.{m.group(2)}."),
]


def _rename(sd: Dict[str, torch.Tensor], rules) -> Dict[str, torch.Tensor]:
    import re

    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def cswin_from_official(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Rename a state dict of the official CSwin code ("CSWin Transformer", Dong et al., CVPR
    2022: ``stage1_conv_embed.{0,2}``, ``stage{s}.{j}.{qkv,proj,attns.{b}.get_v,...}``,
    ``merge{i}.{conv,norm}``) to vitlab's keys; ``{"state_dict_ema" | "state_dict" | "model": sd}``
    wrappers are unwrapped (the EMA weights first, which the released models report)."""
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return _rename(state_dict, _OFFICIAL_TO_VITLAB)


def cswin_to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`cswin_from_official`: vitlab keys to the official CSwin code's."""
    return _rename(state_dict, _VITLAB_TO_OFFICIAL)


# -- registered recipes -------------------------------------------------------------------------
def _register_cswin(name: str, defaults: Dict[str, Any], doc: str) -> None:
    def factory(**overrides: Any) -> CSwinTransformer:
        kw = {**defaults, **overrides}
        img = kw.get("img_size", 224)
        if img >= 384 and "split_size" not in overrides:
            # the official 384 models (CSWin-B@384, FLatten-CSwin-B@384): stripes 12 in stages 3-4
            kw["split_size"] = tuple(kw["split_size"][:2]) + (12, 12)
        default_cfg = make_default_cfg(name, img, kw.get("num_classes", 1000), kw.get("in_chans", 3),
                                       crop_pct=1.0 if img >= 384 else 0.9)
        return CSwinTransformer(architecture=name, default_cfg=default_cfg, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name}: {doc} ({defaults})."
    register_model(factory)


_CSWIN_T = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7),
                drop_path_rate=0.2)
_register_cswin("cswin_tiny_224", _CSWIN_T, "CSwin-T (Dong et al., CVPR 2022)")
# LipsFormer-CSwin-T (Qi et al., ICLR 2023, spec section 8): cosine attention tau 12, CenterNorm at
# the end of each block, weighted shortcuts alpha_0 = 0.2, spectral init, conv units, LePE / sqrt(heads),
# 4x4 stem, 2x2 merges, no final norm.
_register_cswin("lipsformer_cswin_tiny",
                dict(_CSWIN_T, mixer="cosine", mixer_kwargs=dict(tau=12.0), norm="center", shortcut="weighted",
                     shortcut_init=0.2, init="spectral", norm_layout="end", conv_units=True, lepe_div_heads=True,
                     stem_kernel=4, merge_kernel=2, final_norm=False),
                "LipsFormer (Qi et al., ICLR 2023) CSwin-T")
# FLatten-CSwin-T (Han et al., ICCV 2023): depths 2,4,18,1; focused linear attention over the whole
# map in stages 1-2 (plus LePE), cross-shaped windows (stripes 7) in stages 3-4.
_register_cswin("flatten_cswin_tiny",
                dict(_CSWIN_T, depths=(2, 4, 18, 1), attn_type="LLSS",
                     mixer_kwargs=dict(focusing_factor=3.0, kernel_size=5)),
                "FLatten (Han et al., ICCV 2023) CSwin-T")
