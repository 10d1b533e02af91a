"""Vision transformers for volumes and video: the 3-D ViT and ViViT, on the one Block and Backbone.

"ViViT: A Video Vision Transformer" (Arnab et al., ICCV 2021).  Input ``(B, C, T, H, W)``; the stem is
the tubelet embedding (:class:`~vitlab.layers.video.TubeletEmbed`, sec. 3.2), the token grid is 3-D
``(T', H', W')`` and travels in the :class:`~vitlab.layers.TokenLayout` as every grid does.

* :class:`VideoViT` with ``factorisation="none"``: ViViT's model 1 (spatio-temporal attention, sec. 3.3),
  which is also the plain 3-D ViT of volumes (vit-pytorch's ``vit_3d``): one transformer over all
  tubelet tokens, class token, learned (or 3-D sin-cos) position table.
* ``factorisation="self_attention"``: model 3, every layer a spatial attention (``axial`` grouping over
  ``(H', W')``), a temporal one (over ``T'``), then the MLP, each with its own pre-norm and residual:
  ``y_s = MSA_s(LN(z)) + z``, ``y_t = MSA_t(LN(y_s)) + y_s``, ``z' = MLP(LN(y_t)) + y_t`` (eq. 6-8); no
  class token (as the paper), global average pooling.  Built as pairs of Blocks, the first without MLP.
* :class:`ViViTFactorisedEncoder`: model 2 (sec. 3.3): a spatial encoder over the tokens of each temporal
  index with its own class token, then a temporal encoder over the ``T'`` spatial class tokens and a
  temporal class token.  Two stages of the Backbone: the spatial one runs on a ``(T', 1 + H'W')`` token grid
  with ``axial`` grouping along its second axis (so each frame's class token attends only to its frame);
  the temporal stage's downsampler takes the class tokens out.

Names and sizes as the paper: ``vivit_{base,large}_{st,fsa,fe}`` (ViT-B/L widths, tubelet 2 x 16 x 16, 32
frames at 224 px, Kinetics' 400 classes; FE: 4 temporal layers, sec. 4.1) and small ``vit3d_*`` recipes.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, init_weights
from vitlab.layers.pos_embed import sincos_nd_big_vision
from vitlab.layers.video import TubeletEmbed, sincos_nd
from vitlab.models.backbone import Backbone, Stage
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["VideoViT", "ViViTFactorisedEncoder"]

FACTORISATIONS = ("none", "self_attention")


class _VideoBase(Backbone):
    """What the video models share: the 5-D input check, the tubelet stem and the default config."""

    def check_input(self, x: torch.Tensor) -> None:
        getattr(self.patch_embed, "embed", self.patch_embed).check(x)

    def _stem(self, img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim) -> None:
        self.patch_embed = TubeletEmbed(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.stem_reduction = patch_size
        self.in_chans, self.num_features, self.embed_dim = in_chans, embed_dim, embed_dim

    @staticmethod
    def _cfg(cfg: Optional[Dict[str, Any]], architecture: str, img_size: int, num_frames: int, num_classes: int,
             in_chans: int) -> Dict[str, Any]:
        """The default config with a video ``input_size`` ``(C, T, H, W)``."""
        cfg = cfg or make_default_cfg(architecture, img_size, num_classes, in_chans)
        return dict(cfg, input_size=(in_chans, num_frames, img_size, img_size))

    def _make_block(self, spec: MixerSpec, dim: int, heads: int, layout: TokenLayout, mlp: bool, drop_path: float,
                    kw: Dict[str, Any], grouping: Optional[Tuple[str, Dict[str, Any]]] = None) -> Block:
        """One Block; ``kw`` holds the attention options and ``kw["block"]`` the Block's (norm, wiring,
        branch scale, FeatScale), the same on every family."""
        attn = spec.build(dim, heads, layout, qkv_bias=kw["qkv_bias"], attn_drop=kw["attn_drop_rate"],
                          proj_drop=kw["drop_rate"], **({"grouping": grouping} if grouping else {}))
        ffn = Mlp(dim, int(dim * kw["mlp_ratio"]), drop=kw["drop_rate"]) if mlp else None
        if ffn is None and kw["block"]["wiring"] == "parallel":
            raise ValueError("wiring 'parallel' runs attention and MLP side by side; the factorised self-attention's "
                             "spatial blocks have no MLP")
        return Block(dim, attn, ffn, norm_eps=kw["norm_eps"], drop_path=drop_path, **kw["block"])

    @staticmethod
    def _block_options(norm: str, branch_scale: str, shortcut_init: Optional[float], featscale: bool, wiring: str,
                       depth: int) -> Dict[str, Any]:
        return dict(norm=norm, branch_scale=branch_scale, branch_scale_init=shortcut_init, featscale=featscale,
                    wiring=wiring, total_depth=depth)

    def _head(self, embed_dim: int, num_classes: int, drop_rate: float, norm: str = "layernorm") -> None:
        self.norm = create_norm(norm, embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()


class VideoViT(_VideoBase):
    """ViViT model 1 (``factorisation="none"``, also the 3-D ViT) or model 3 (``"self_attention"``); see the
    module docstring.  ``mixer``, ``core``, ``modifiers``, ``attn_position`` (``("rope",)``: 3-D, or the attended
    axes' coordinates in factorised attention), ``mixer_kwargs`` choose the attention as in every family;
    ``pos_embed`` is ``learned``, ``sincos`` (3-D) or ``sincos_big_vision``
    (:func:`~vitlab.layers.pos_embed.sincos_nd_big_vision`);
    ``class_token`` (default: model 1 has one, model 3 none) ``False`` pools by the mean (3-D SimpleViT)."""

    stage_attr = "blocks"
    prefix_names = ("cls_token",)

    def __init__(self, img_size: int = 224, num_frames: int = 32, patch_size: int = 16, tubelet_size: int = 2,
                 in_chans: int = 3, num_classes: int = 400, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, factorisation: str = "none",
                 pos_embed: str = "learned", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, mixer: str = "softmax",
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None, norm: str = "layernorm", branch_scale: str = "plain",
                 shortcut_init: Optional[float] = None, featscale: bool = False, wiring: str = "pre",
                 architecture: str = "vivit", class_token: Optional[bool] = None,
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        if factorisation not in FACTORISATIONS:
            raise ValueError(f"factorisation must be one of {FACTORISATIONS}, got {factorisation!r}")
        if pos_embed not in ("learned", "sincos", "sincos_big_vision"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos' or 'sincos_big_vision', got {pos_embed!r}")
        self.num_classes, self.factorisation = num_classes, factorisation
        self._stem(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim)
        factorised = factorisation == "self_attention"
        class_token = not factorised if class_token is None else bool(class_token)
        if factorised and class_token:  # axial groups take no prefix token (the paper's model 3 has none)
            raise ValueError("factorisation='self_attention' has no class token; got class_token=True")
        self.global_pool = "token" if class_token else "avg"
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self._position_table(pos_embed, int(class_token), embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        layout = TokenLayout(self.grid_size, int(class_token))
        kw = dict(qkv_bias=qkv_bias, attn_drop_rate=attn_drop_rate, drop_rate=drop_rate, mlp_ratio=mlp_ratio,
                  norm_eps=norm_eps, block=self._block_options(norm, branch_scale, shortcut_init, featscale, wiring,
                                                               depth))
        dpr = drop_path_rates(drop_path_rate, depth)
        blocks = []
        for i in range(depth):
            if factorised:  # spatial attention (no MLP), then temporal attention + MLP
                blocks.append(self._make_block(spec, embed_dim, num_heads, layout, False, dpr[i], kw,
                                          ("axial", dict(axes=(1, 2)))))
            blocks.append(self._make_block(spec, embed_dim, num_heads, layout, True, dpr[i], kw,
                                      ("axial", dict(axes=(0,))) if factorised else None))
        self.blocks = nn.Sequential(*blocks)
        self._head(embed_dim, num_classes, drop_rate, norm)
        self.fc_norm = nn.Identity()
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        init_weights(self, "trunc_normal")
        self.default_cfg = self._cfg(default_cfg, architecture, img_size, num_frames, num_classes, in_chans)

    def _position_table(self, kind: str, num_prefix: int, dim: int) -> None:
        """Learned ``(1, P + N, dim)``, or a fixed 3-D sin-cos buffer with zero prefix rows."""
        if kind == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + self.patch_embed.num_patches, dim))
            return
        code = (sincos_nd if kind == "sincos" else sincos_nd_big_vision)(self.grid_size, dim)
        self.register_buffer("pos_embed", torch.cat([code.new_zeros(num_prefix, dim), code])[None], persistent=False)


class FrameTokens(nn.Module):
    """ViViT-FE's stem: tubelet tokens plus the learned position table, then each temporal index's own
    class token (``cls_token``, shared by the frames) in front of its ``H'W'`` tokens: tokens on a
    ``(T', 1 + H'W')`` grid."""

    def __init__(self, embed: TubeletEmbed, embed_dim: int):
        super().__init__()
        self.embed = embed
        self.pos_embed = nn.Parameter(torch.zeros(1, embed.num_patches, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        t, h, w = embed.grid_size
        self.grid_size = (t, 1 + h * w)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.embed(x) + self.pos_embed
        b, (t, s), c = x.shape[0], self.grid_size, x.shape[-1]
        x = torch.cat([self.cls_token.expand(b, t, -1, -1), x.view(b, t, s - 1, c)], dim=2)
        return x.reshape(b, t * s, c), self.grid_size


class FrameClassTokens(nn.Module):
    """The temporal stage's downsampler: the spatial class token of every temporal index, ``(B, T', C)``."""

    on_map = False

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, Tuple[int]]:
        t, s = layout.grid
        return x.view(x.shape[0], t, s, -1)[:, :, 0], (t,)


class ViViTFactorisedEncoder(_VideoBase):
    """ViViT model 2, the factorised encoder (see the module docstring): ``depth`` spatial layers, each frame's
    tokens with that frame's class token, then ``temporal_depth`` temporal layers over the frames' class
    tokens and the temporal class token (``cls_token``), pooled by that token.  ``attn_position`` (e.g.
    ``("rope",)``) is refused: a frame's tokens are one sequence here, not a grid."""

    stage_attr = "stages"
    prefix_names = ("cls_token",)
    token_stage = 1
    global_pool = "token"

    def __init__(self, img_size: int = 224, num_frames: int = 32, patch_size: int = 16, tubelet_size: int = 2,
                 in_chans: int = 3, num_classes: int = 400, embed_dim: int = 768, depth: int = 12,
                 temporal_depth: int = 4, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", branch_scale: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, wiring: str = "pre", architecture: str = "vivit_fe",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.num_classes = num_classes
        self._stem(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim)
        self.patch_embed = FrameTokens(self.patch_embed, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        if spec.position:  # the spatial axis is a frame's class token and raster-ordered patches, not a 2-D grid
            raise ValueError(f"attn_position={spec.position} needs groups on a token grid; the factorised encoder's "
                             "spatial attention runs on each frame as one sequence (use vivit_*_st or vivit_*_fsa)")
        kw = dict(qkv_bias=qkv_bias, attn_drop_rate=attn_drop_rate, drop_rate=drop_rate, mlp_ratio=mlp_ratio,
                  norm_eps=norm_eps, block=self._block_options(norm, branch_scale, shortcut_init, featscale, wiring,
                                                               depth + temporal_depth))
        dpr = drop_path_rates(drop_path_rate, depth + temporal_depth)
        t = self.grid_size[0]
        frames = TokenLayout(self.patch_embed.grid_size)
        spatial = [self._make_block(spec, embed_dim, num_heads, frames, True, dpr[i], kw, ("axial", dict(axes=(1,))))
                   for i in range(depth)]
        temporal = [self._make_block(spec, embed_dim, num_heads, TokenLayout((t,), 1), True, dpr[depth + i], kw)
                    for i in range(temporal_depth)]
        self.stages = nn.ModuleList([
            Stage(spatial, embed_dim, patch_size, self.patch_embed.grid_size,
                  norm=create_norm(norm, embed_dim, eps=norm_eps)),
            Stage(temporal, embed_dim, patch_size, (t,), downsample=FrameClassTokens())])
        self._head(embed_dim, num_classes, drop_rate, norm)
        for tok in (self.cls_token, self.patch_embed.cls_token):
            nn.init.normal_(tok, std=1e-6)
        nn.init.trunc_normal_(self.patch_embed.pos_embed, std=0.02)
        init_weights(self, "trunc_normal")
        self.default_cfg = self._cfg(default_cfg, architecture, img_size, num_frames, num_classes, in_chans)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^patch_embed|^cls_token", blocks=[(r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                             (r"^stages\.0\.norm", (0, 99998)),
                                                             (r"^norm", (99999,))])


# -- registered recipes ---------------------------------------------------------------------------
_VIDEO = dict(img_size=224, num_frames=32, patch_size=16, tubelet_size=2, num_classes=400)
_WIDTH = {"base": dict(embed_dim=768, depth=12, num_heads=12), "large": dict(embed_dim=1024, depth=24, num_heads=16)}
for _size, _w in _WIDTH.items():
    register_recipe(VideoViT, f"vivit_{_size}_st", dict(_VIDEO, **_w),
                    f"ViViT-{_size[0].upper()} model 1 (spatio-temporal attention), 32 x 224 x 224, tubelet 2x16x16")
    register_recipe(VideoViT, f"vivit_{_size}_fsa", dict(_VIDEO, factorisation="self_attention", **_w),
                    f"ViViT-{_size[0].upper()} model 3 (factorised self-attention), 32 x 224 x 224, tubelet 2x16x16")
    register_recipe(ViViTFactorisedEncoder, f"vivit_{_size}_fe", dict(_VIDEO, temporal_depth=4, **_w),
                    f"ViViT-{_size[0].upper()} model 2 (factorised encoder, 4 temporal layers), 32 x 224 x 224")
# 3-D ViT for volumes (vit-pytorch's vit_3d): 16 x 128 x 128 single-channel volumes, cubes of 16 x 16 x 16
register_recipe(VideoViT, "vit3d_small_patch16", dict(img_size=128, num_frames=16, patch_size=16, tubelet_size=16,
                                                       in_chans=1, num_classes=10, embed_dim=384, depth=12,
                                                       num_heads=6), "ViT-S over 3-D volumes (16 x 128 x 128)")
