"""CvT, built from vitlab parts.

"CvT: Introducing Convolutions to Vision Transformers" (Wu, Xiao, Codella, Liu, Dai, Yuan and Zhang, ICCV
2021).  Three stages, each opening with a **convolutional token embedding** (sec. 3.1: an overlapping strided
conv, 7x7/4 then 3x3/2, + LayerNorm) and running blocks whose attention takes q, k, v from a
**convolutional projection** (sec. 3.2: depthwise 3x3 conv + BatchNorm + pointwise Linear; stride 1 for q,
2 for k and v), the projection part ``"conv"`` (:mod:`vitlab.layers.conv_projection`).  No position
embedding (sec. 3.4); the class token joins in the last stage and the classifier reads it after the final
LayerNorm.  As the official code (microsoft/CvT, ``lib/models/cls_cvt.py``): the attention scales the logits
by ``dim ** -0.5`` (not ``head_dim ** -0.5``; ``scale_by_dim=False`` for the latter), the MLP uses QuickGELU
(``x * sigmoid(1.702 x)``; ``mlp_act="gelu"`` for the exact GELU), every LayerNorm has eps 1e-5.

Parts as in every family: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)`` needs ``stride_kv=1``)
(a linear-cost core, FLatten's or XCiT's, attends over every token: keys and values keep stride 1, as "FLatten
Transformer" does with PVT's key reduction), ``norm``, ``branch_scale`` / ``shortcut_init``, ``featscale``, ``wiring``,
``init``, ``mixer_kwargs``.

State-dict keys: ``patch_embed.{proj,norm}``, ``stages.{i}.downsample.{proj,norm}`` (the token embeddings of
stages 2-3), ``stages.{i}.blocks.{j}.{norm1, attn.conv_proj_{q,k,v}.{conv,bn}, attn.proj_{q,k,v},
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``cls_token``, ``norm``, ``head`` (timm has no CvT);
:func:`cvt_from_official` / :func:`cvt_to_official` rename the official checkpoints' keys
(``stage{i}.patch_embed``, ``stage{i}.blocks``, ``stage2.cls_token``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from timm.layers import QuickGELU
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.models.backbone import Backbone, ConvPatchEmbed, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["ConvolutionalVisionTransformer", "cvt_attention", "cvt_block", "cvt_from_official", "cvt_to_official"]

_ACTS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def cvt_attention(spec: MixerSpec, dim: int, kernel_size: int, stride_kv: int, scale_by_dim: bool,
                  **attention: Any) -> Dict[str, Any]:
    """What CvT asks of a block's attention (Wu et al., ICCV 2021, sec. 3.2): the convolutional projection,
    keys and values at ``stride_kv`` (1 for a linear-cost core, which attends over every token), and the
    official code's logit scale ``dim ** -0.5`` (``qk_scale``, read by the softmax family of cores).  Nothing for a
    non-attention mixer."""
    if not spec.attention:
        return {}
    stride = 1 if spec.linear_cost else stride_kv
    att = dict(attention, projection=("conv", dict(kernel_size=kernel_size, stride_kv=stride)))
    if scale_by_dim and "qk_scale" not in spec.kwargs:  # the softmax family reads it; cosine keeps its tau
        att["qk_scale"] = dim ** -0.5
    return att


def cvt_block(dim: int, heads: int, mlp_ratio: float, layout: TokenLayout, spec: MixerSpec, attention: Dict[str, Any],
              mlp_act: str, drop: float, **block: Any) -> Block:
    """One CvT block (Wu et al., ICCV 2021, sec. 3.2, Fig. 2b): the one :class:`Block` with the user's mixer built
    into CvT's attention request and the official MLP (``mlp_act``, QuickGELU by default)."""
    mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=_ACTS[mlp_act], drop=drop)
    return Block(dim, spec.build(dim, heads, layout, **attention), mlp, **block)


def _per_stage(v: Any, n: int, what: str) -> Tuple[Any, ...]:
    t = tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    if len(t) != n:
        raise ValueError(f"{what} needs {n} values (one per stage), got {len(t)}: {t}")
    return t


def _drop_paths(rate: Union[float, Sequence[float]], depths: Sequence[int]) -> list:
    """A float: the linear rule over all blocks (DeiT, Swin); one rate per stage: ``linspace(0, r_i, d_i)``
    inside each stage (the official CvT configs, e.g. ``(0, 0, 0.1)`` for CvT-13)."""
    if not isinstance(rate, (list, tuple)):
        return drop_path_rates(float(rate), sum(depths))
    return [r for ri, d in zip(_per_stage(rate, len(depths), "drop_path_rate"), depths)
            for r in drop_path_rates(float(ri), d)]


class ConvolutionalVisionTransformer(Backbone):
    """CvT (Wu et al., ICCV 2021) whose parts are arguments; see the module docstring.

    Sizes per stage: ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, the token embeddings'
    ``patch_sizes`` / ``patch_strides`` / ``patch_paddings``, the projection's ``kernel_qkv`` and ``stride_kv``.
    ``cls_token=True``: the class token joins the last stage and is pooled (``global_pool='token'``), else the
    last map is averaged after the final norm.  Any input size works (the maps come from the convs).
    """

    prefix_names = ("cls_token",)

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 num_heads: Sequence[int] = (1, 3, 6), mlp_ratios: Union[float, Sequence[float]] = 4.0,
                 patch_sizes: Sequence[int] = (7, 3, 3), patch_strides: Sequence[int] = (4, 2, 2),
                 patch_paddings: Sequence[int] = (2, 1, 1), kernel_qkv: Union[int, Sequence[int]] = 3,
                 stride_kv: Union[int, Sequence[int]] = 2, qkv_bias: bool = True, cls_token: bool = True,
                 scale_by_dim: bool = True, mlp_act: str = "quick_gelu", mixer: str = "softmax",
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 norm: str = "layernorm", norm_eps: float = 1e-5, branch_scale: Optional[str] = None,
                 shortcut: str = "plain", shortcut_init: Optional[float] = None, featscale: bool = False,
                 wiring: str = "pre", init: str = "trunc_normal", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: Union[float, Sequence[float]] = 0.0, mixer_kwargs: Optional[Dict[str, Any]] = None,
                 architecture: str = "cvt", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        depths = tuple(depths)
        ns = len(depths)
        if ns < 1 or any(d < 1 for d in depths):
            raise ValueError(f"depths must be positive stage depths, got {depths}")
        if mlp_act not in _ACTS:
            raise ValueError(f"mlp_act must be one of {tuple(_ACTS)}, got {mlp_act!r}")
        dims, heads, ratios, kernels, strides, pads, kq, skv = (
            _per_stage(v, ns, w) for v, w in ((embed_dims, "embed_dims"), (num_heads, "num_heads"),
                                              (mlp_ratios, "mlp_ratios"), (patch_sizes, "patch_sizes"),
                                              (patch_strides, "patch_strides"), (patch_paddings, "patch_paddings"),
                                              (kernel_qkv, "kernel_qkv"), (stride_kv, "stride_kv")))
        img = img_size if isinstance(img_size, int) else img_size[0]
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img
        self.num_features = self.embed_dim = dims[-1]
        self.global_pool = "token" if cls_token else "avg"
        self.token_stage = ns - 1  # the class token joins the last stage (sec. 3, Fig. 2)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        dpr = _drop_paths(drop_path_rate, depths)
        block_kw = dict(norm=norm, norm_eps=norm_eps, wiring=wiring, branch_scale=branch_scale or shortcut,
                        branch_scale_init=shortcut_init, total_depth=sum(depths), featscale=featscale)
        self.patch_embed = ConvPatchEmbed(in_chans, dims[0], kernels[0], strides[0], pads[0], norm, norm_eps)
        grid, cur, stages, reduction = self.patch_embed.out_size((img, img)), 0, [], strides[0]
        if min(grid) < 1:
            raise ValueError(f"img_size {img} is too small for the {kernels[0]}x{kernels[0]} stride-{strides[0]} stem")
        for i in range(ns):
            down = None
            if i > 0:
                down = ConvPatchEmbed(dims[i - 1], dims[i], kernels[i], strides[i], pads[i], norm, norm_eps)
                grid, reduction = down.out_size(grid), reduction * strides[i]
            layout = TokenLayout(grid, int(cls_token and i == ns - 1))
            att = cvt_attention(spec, dims[i], kq[i], skv[i], scale_by_dim, qkv_bias=qkv_bias,
                                attn_drop=attn_drop_rate, proj_drop=drop_rate)
            blocks = [cvt_block(dims[i], heads[i], ratios[i], layout, spec, att, mlp_act, drop_rate,
                                drop_path=dpr[cur + j], **block_kw) for j in range(depths[i])]
            stages.append(Stage(blocks, dims[i], reduction, grid, downsample=down))
            cur += depths[i]
        self.stages = nn.ModuleList(stages)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[-1])) if cls_token else None
        self.norm = create_norm(norm, dims[-1], eps=norm_eps)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        with torch.no_grad():
            if self.cls_token is not None:
                nn.init.trunc_normal_(self.cls_token, std=0.02)
            init_weights(self, init)  # Linear weights; LayerNorm / BatchNorm at (1, 0) as the official init
        self.default_cfg = default_cfg or make_default_cfg(architecture, img, num_classes, in_chans)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The stem, then per stage its token embedding with its first block, the class token with the last
        stage (where it joins), the final norm last (as PVT's)."""
        last = (len(self.stages) - 1, 0)
        if coarse:
            return dict(stem=r"^patch_embed",
                        blocks=[(r"^stages\.(\d+)", None), (r"^cls_token", last[:1]), (r"^norm", (99999,))])
        return dict(stem=r"^patch_embed", blocks=[
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^cls_token", last), (r"^norm", (99999,))])

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool != self.global_pool:
            raise ValueError(f"global_pool is fixed at construction for CvT (cls_token=True pools the class token, "
                             f"False averages): this model has {self.global_pool!r}, got {global_pool!r}")


# -- the official checkpoints' keys ---------------------------------------------------------------
def cvt_from_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A microsoft/CvT state dict (``stage{i}.patch_embed``, ``stage{i}.blocks``, ``stage{i}.cls_token``) with
    vitlab's keys (module docstring); block contents keep their names."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^stage0\.patch_embed\.", "patch_embed.", k)
        k = re.sub(r"^stage(\d+)\.patch_embed\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stage(\d+)\.blocks\.", r"stages.\1.blocks.", k)
        out[re.sub(r"^stage\d+\.cls_token$", "cls_token", k)] = v
    return out


def cvt_to_official(state_dict: Dict[str, torch.Tensor], num_stages: int = 3) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`cvt_from_official` (the class token goes to the last stage)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed\.", "stage0.patch_embed.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"stage\1.patch_embed.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", r"stage\1.blocks.", k)
        out[re.sub(r"^cls_token$", f"stage{num_stages - 1}.cls_token", k)] = v
    return out


# -- registered recipes (the official configs' names and sizes, Table 2) -----------------------------
_CVT_SIZES = {
    "13": dict(embed_dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 2, 10)),
    "21": dict(embed_dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 4, 16)),
    "w24": dict(embed_dims=(192, 768, 1024), num_heads=(3, 12, 16), depths=(2, 2, 20)),
}

for _size, _img in (("13", 224), ("13", 384), ("21", 224), ("21", 384), ("w24", 384)):
    register_recipe(ConvolutionalVisionTransformer, f"cvt_{_size}_{_img}", dict(_CVT_SIZES[_size], img_size=_img),
                    f"CvT-{_size.upper()} at {_img}x{_img} (Wu et al., ICCV 2021, Table 2; official config "
                    f"cvt-{_size}-{_img}x{_img}).", crop_pct=0.875 if _img == 224 else 1.0)
