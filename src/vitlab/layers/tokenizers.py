"""Tokenizing stems: T2T-ViT's tokens-to-token module and CCT's convolutional tokenizer.

Both are registered patch embeddings (:data:`~vitlab.layers.EMBEDS` ``"t2t"`` and ``"cct"``), so any isotropic
backbone can use them (``create_model("vit_tiny_patch4_32", embed="cct")``).  Like :class:`PatchEmbed` they take
``(img_size, patch_size, in_chans, embed_dim)``; ``patch_size`` is the stem's total stride (the T2T soft splits'
strides multiplied, the CCT convolutions' and poolings' strides multiplied) and is checked against it.  Each
exposes ``img_size``, ``patch_size``, ``grid_size`` and ``num_patches``.

* "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet" (Yuan, Chen, Wang, Yu, Shi, Jiang,
  Tay, Feng, Yan; ICCV 2021), sec. 3.1: a soft split (``nn.Unfold`` with overlapping ``k x k`` windows), then a
  small token transformer re-structures the tokens into a map, then the next soft split; a Linear projects the
  last split to ``embed_dim``.  The token transformer is the official code's ``token_performer.py`` (random-feature
  attention, "Rethinking Attention with Performers", Choromanski et al., ICLR 2021) or ``token_transformer.py``
  (one-head softmax attention); both use ``v`` as the skip connection as the input width differs from the output.
* "Escaping the Big Data Paradigm with Compact Transformers" (Hassani, Walton, Shah, Abuduweili, Li, Shi; 2021),
  sec. 3.3: ``n`` blocks of ``k x k`` conv (no bias) -> ReLU -> 3x3 max-pool stride 2.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers.linear import Linear
from vitlab.layers.mlp import Mlp
from vitlab.layers.patch_embed import EMBEDS, to_2tuple
from vitlab.layers.video import check_video

__all__ = ["conv_out", "grid_after", "soft_split", "TokenPerformer", "TokenTransformer", "T2TEmbed", "CCTTokenizer", "CCTTokenizer3d"]


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution / pooling / unfold along one axis: ``(size + 2p - k) // s + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def grid_after(size: Sequence[int], ops) -> Tuple[int, ...]:
    """``size`` (one length per axis) through the convolutions / poolings ``ops``, each ``(kernel, stride,
    padding)`` with an int for every axis or one per axis: :func:`conv_out` per axis."""
    for op in ops:
        k, s, p = (v if isinstance(v, tuple) else (v,) * len(size) for v in op)
        size = tuple(conv_out(*a) for a in zip(size, k, s, p))
    return tuple(size)


def soft_split(x: torch.Tensor, kernel: int, stride: int, padding: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """T2T's soft split of a ``(B, C, H, W)`` map: every ``kernel x kernel`` window (zero padding ``padding``,
    step ``stride``) becomes one token of ``C * kernel**2`` values (channel-major, as ``nn.Unfold``).
    Returns ``((B, h*w, C*k*k) tokens, (h, w))``."""
    hw = (conv_out(x.shape[-2], kernel, stride, padding), conv_out(x.shape[-1], kernel, stride, padding))
    return F.unfold(x, kernel, padding=padding, stride=stride).transpose(1, 2), hw


def _check_size(x: torch.Tensor, img_size: Tuple[int, int], dynamic: bool, name: str) -> None:
    if not dynamic and tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"input image size {x.shape[-2]}x{x.shape[-1]} does not match the {name} stem's img_size "
                         f"{img_size[0]}x{img_size[1]}; create the model with img_size={x.shape[-2]} "
                         f"(or dynamic_img_size=True)")


class TokenPerformer(nn.Module):
    """T2T-ViT's Performer token layer (official ``Token_performer``, kernel ratio 0.5, one head).

    ``y = v + drop(proj(D^-1 phi(q) (phi(k)^T v)))``, ``D = phi(q) sum_j phi(k_j)``, with the positive random
    features ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)`` of ``m = dim * kernel_ratio`` fixed orthogonal rows
    ``w`` (scaled by ``sqrt(m)``, as in the official code); then ``y + mlp(norm2(y))``.  ``dim_in`` is the soft
    split's width, ``dim`` the token width.  Names (``kqv``, ``proj``, ``norm1``, ``norm2``, ``w``) are the
    official code's; its MLP is a vitlab :class:`Mlp` (``fc1``/``fc2``) with the dropout only at its end."""

    def __init__(self, dim_in: int, dim: int, kernel_ratio: float = 0.5, proj_drop: float = 0.1,
                 mlp_drop: float = 0.1, eps: float = 1e-8):
        super().__init__()
        if not 0 < kernel_ratio <= 1:
            raise ValueError(f"kernel_ratio must be in (0, 1], got {kernel_ratio}")
        self.dim, self.eps = dim, eps
        self.m = max(int(dim * kernel_ratio), 1)
        self.norm1 = nn.LayerNorm(dim_in)
        self.kqv = Linear(dim_in, 3 * dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim)
        self.mlp.drop2 = nn.Dropout(mlp_drop)  # the official MLP drops only after its second Linear
        w = torch.randn(self.m, dim)
        if not w.is_meta:  # QR is not defined on 'meta'; the shape is all a meta model needs
            w = nn.init.orthogonal_(w) * math.sqrt(self.m)
        self.register_buffer("w", w)  # fixed random features (the official code: a frozen Parameter)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features ``(B, T, m)`` of ``(B, T, dim)`` queries or keys, in float32."""
        x = x.float()
        return torch.exp(x @ self.w.float().t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.dim, dim=-1)  # the official order: k, q, v
        kp, qp = self.features(k), self.features(q)
        denom = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
        y = (qp @ (kp.transpose(1, 2) @ v.float())) / (denom + self.eps)  # linear in T: never the T x T matrix
        return v + self.proj_drop(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenTransformer(nn.Module):
    """T2T-ViT_t's token layer (official ``Token_transformer``): one-head softmax attention from ``dim_in`` to
    ``dim`` with ``v`` as the skip (``v + proj(softmax(q k^T / sqrt(dim_in)) v)``: the official scale uses the
    input width), then ``x + mlp(norm2(x))`` (MLP ratio 1).  Names (``norm1``, ``attn.qkv``, ``attn.proj``,
    ``norm2``, ``mlp.fc1``/``fc2``) are the official code's."""

    def __init__(self, dim_in: int, dim: int, mlp_ratio: float = 1.0, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.scale, self.attn_drop = dim, dim_in ** -0.5, attn_drop
        self.norm1 = nn.LayerNorm(dim_in)
        self.attn = nn.Module()
        self.attn.qkv = Linear(dim_in, 3 * dim, bias=qkv_bias)
        self.attn.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(x).split(self.dim, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           scale=self.scale)
        return v + self.proj_drop(self.attn.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


TOKEN_MIXERS = {"performer": TokenPerformer, "transformer": TokenTransformer}
T2T_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of the three soft splits


class T2TEmbed(nn.Module):
    """T2T-ViT's tokens-to-token stem (Yuan et al., ICCV 2021, sec. 3.1; see the module docstring).

    ``splits``: ``(kernel, stride, padding)`` per soft split (default 7/4/2, 3/2/1, 3/2/1, the official code's);
    a token layer (``token_mixer``: ``performer`` | ``transformer``, width ``token_dim``) runs after every split but
    the last, whose tokens ``project`` maps to ``embed_dim``.  ``patch_size`` must equal the strides' product.
    Names (``attention1``, ``attention2``, ``project``) are the official code's."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768,
                 dynamic_img_size: bool = False, token_mixer: str = "performer", token_dim: int = 64,
                 splits: Sequence[Sequence[int]] = T2T_SPLITS, kernel_ratio: float = 0.5, mlp_ratio: float = 1.0):
        super().__init__()
        if token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"token_mixer must be one of {tuple(TOKEN_MIXERS)}, got {token_mixer!r}")
        self.splits = tuple(tuple(int(v) for v in s) for s in splits)
        if not self.splits or any(len(s) != 3 for s in self.splits):
            raise ValueError(f"splits must be (kernel, stride, padding) triples, got {splits!r}")
        stride = math.prod(s[1] for s in self.splits)
        self.patch_size = to_2tuple(patch_size)
        if self.patch_size != (stride, stride):
            raise ValueError(f"patch_size {patch_size} does not match the T2T soft splits' total stride {stride} "
                             f"(splits {self.splits}); pass patch_size={stride} or other embed_kwargs splits")
        self.img_size, self.dynamic_img_size = to_2tuple(img_size), dynamic_img_size
        self.grid_size = self.out_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        dims = [in_chans] + [token_dim] * (len(self.splits) - 1)
        extra = dict(kernel_ratio=kernel_ratio) if token_mixer == "performer" else dict(mlp_ratio=mlp_ratio)
        for i, ((k, _, _), c) in enumerate(zip(self.splits[:-1], dims)):
            self.add_module(f"attention{i + 1}", TOKEN_MIXERS[token_mixer](c * k * k, token_dim, **extra))
        self.project = Linear(dims[-1] * self.splits[-1][0] ** 2, embed_dim)

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid for an ``hw`` image: through every soft split."""
        return grid_after(hw, self.splits)

    def forward(self, x: torch.Tensor):
        """``(B, C, H, W)`` -> ``(B, N, embed_dim)`` tokens (``(tokens, grid)`` with ``dynamic_img_size``)."""
        _check_size(x, self.img_size, self.dynamic_img_size, "T2T")
        for i, (k, s, p) in enumerate(self.splits):
            tokens, hw = soft_split(x, k, s, p)
            if i + 1 < len(self.splits):  # re-structurization: tokens -> token layer -> map
                tokens = getattr(self, f"attention{i + 1}")(tokens)
                x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *hw)
        tokens = self.project(tokens)
        return (tokens, hw) if self.dynamic_img_size else tokens


class CCTTokenizer(nn.Module):
    """CCT's convolutional tokenizer (Hassani et al., 2021, sec. 3.3; official ``Tokenizer``).

    ``n_conv_layers`` blocks of ``kernel_size x kernel_size`` conv (``stride``, ``padding``; defaults as the
    official ``_cct``: ``max(1, k // 2 - 1)`` and ``max(1, k // 2)``; no bias) -> ReLU -> max-pool
    (``pooling_kernel_size`` / ``pooling_stride`` / ``pooling_padding``, 3/2/1); the hidden convs have
    ``in_planes`` channels, the last ``embed_dim``.  ``n_conv_layers`` defaults to the number of blocks whose
    strides make ``patch_size``.  Conv weights are Kaiming-normal, as official.  Names (``conv_layers.{i}.0``)
    are the official code's."""

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, embed_dim: int = 768,
                 dynamic_img_size: bool = False, kernel_size: int = 3, n_conv_layers: Optional[int] = None,
                 stride: Optional[int] = None, padding: Optional[int] = None, in_planes: int = 64,
                 pooling_kernel_size: int = 3, pooling_stride: int = 2, pooling_padding: int = 1,
                 max_pool: bool = True, conv_bias: bool = False):
        super().__init__()
        stride = max(1, kernel_size // 2 - 1) if stride is None else stride
        padding = max(1, kernel_size // 2) if padding is None else padding
        pool = (pooling_kernel_size, pooling_stride, pooling_padding) if max_pool else None
        per_layer = stride * (pooling_stride if max_pool else 1)
        self.patch_size = to_2tuple(patch_size)
        n = n_conv_layers if n_conv_layers is not None else round(math.log(self.patch_size[0], max(per_layer, 2)))
        if n < 1 or self.patch_size != (per_layer ** n,) * 2:
            raise ValueError(f"patch_size {patch_size} does not match the CCT tokenizer's total stride "
                             f"{per_layer}**{n_conv_layers or n} (conv stride {stride}, pooling stride "
                             f"{pooling_stride if max_pool else 1}); pass patch_size={per_layer ** max(n, 1)}")
        self.layers_cfg = [(kernel_size, stride, padding)] + ([pool] if pool else [])
        chans = [in_chans] + [in_planes] * (n - 1) + [embed_dim]
        self.conv_layers = nn.Sequential(*[nn.Sequential(
            nn.Conv2d(chans[i], chans[i + 1], kernel_size, stride=stride, padding=padding, bias=conv_bias),
            nn.ReLU(),
            nn.MaxPool2d(pooling_kernel_size, pooling_stride, pooling_padding) if max_pool else nn.Identity())
            for i in range(n)])
        for m in self.conv_layers.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight)
        self.img_size, self.dynamic_img_size = to_2tuple(img_size), dynamic_img_size
        self.grid_size = self.out_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid for an ``hw`` image: through every conv and pooling."""
        return grid_after(hw, self.layers_cfg * len(self.conv_layers))

    def forward(self, x: torch.Tensor):
        """``(B, C, H, W)`` -> ``(B, N, embed_dim)`` tokens (``(tokens, grid)`` with ``dynamic_img_size``)."""
        _check_size(x, self.img_size, self.dynamic_img_size, "CCT")
        x = self.conv_layers(x)
        tokens = x.flatten(2).transpose(1, 2)
        return (tokens, tuple(x.shape[-2:])) if self.dynamic_img_size else tokens


class CCTTokenizer3d(nn.Module):
    """CCT's tokenizer (Hassani et al., 2021, sec. 3.3) for ``(B, C, T, H, W)`` input, as vit-pytorch's ``cct_3d``:
    ``n_conv_layers`` blocks of a ``frame_kernel_size x kernel_size x kernel_size`` Conv3d without bias (strides
    ``(frame_stride, stride, stride)``, padding ``(frame_padding, padding, padding)``, default ``k // 2`` in time)
    -> ReLU -> 3-D max-pool (``frame_pooling_*`` x ``pooling_*``); hidden convs ``in_planes`` wide, the last
    ``embed_dim``.  Tokens in raster order (time slowest) on ``grid_size = (T', H', W')``; ``patch_size`` must be
    the spatial stride.  Kaiming-normal convs and names (``conv_layers.{i}.0``) as the 2-D tokenizer's."""

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, embed_dim: int = 768,
                 dynamic_img_size: bool = False, kernel_size: int = 7, n_conv_layers: int = 1, stride: int = 2,
                 padding: int = 3, in_planes: int = 64, pooling_kernel_size: int = 3, pooling_stride: int = 2,
                 pooling_padding: int = 1, num_frames: int = 8, frame_kernel_size: int = 3, frame_stride: int = 1,
                 frame_padding: Optional[int] = None, frame_pooling_kernel_size: int = 1,
                 frame_pooling_stride: int = 1, frame_pooling_padding: Optional[int] = None):
        super().__init__()
        total = (stride * pooling_stride) ** max(n_conv_layers, 1)  # the spatial stride of the stack
        if dynamic_img_size or n_conv_layers < 1 or to_2tuple(patch_size) != (total, total):
            raise ValueError(f"the 3-D CCT tokenizer needs n_conv_layers >= 1 (got {n_conv_layers}), patch_size="
                             f"{total} (got {patch_size}) and dynamic_img_size=False (got {dynamic_img_size})")
        fp = frame_kernel_size // 2 if frame_padding is None else frame_padding  # vit-pytorch's defaults
        fpp = frame_pooling_kernel_size // 2 if frame_pooling_padding is None else frame_pooling_padding
        conv = ((frame_kernel_size, kernel_size, kernel_size), (frame_stride, stride, stride), (fp, padding, padding))
        pool = ((frame_pooling_kernel_size, pooling_kernel_size, pooling_kernel_size),
                (frame_pooling_stride, pooling_stride, pooling_stride), (fpp, pooling_padding, pooling_padding))
        chans = [in_chans] + [in_planes] * (n_conv_layers - 1) + [embed_dim]
        self.conv_layers = nn.Sequential(*[nn.Sequential(
            nn.Conv3d(chans[i], chans[i + 1], *conv, bias=False), nn.ReLU(), nn.MaxPool3d(*pool))
            for i in range(n_conv_layers)])
        for m in self.conv_layers.modules():
            if isinstance(m, nn.Conv3d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight)
        self.img_size, self.num_frames, self.in_chans = to_2tuple(img_size), num_frames, in_chans
        self.grid_size = grid_after((num_frames, *self.img_size), [conv, pool] * n_conv_layers)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]

    def check(self, x: torch.Tensor) -> None:
        check_video(x, self.in_chans, self.num_frames, self.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` -> ``(B, T'H'W', embed_dim)`` tokens."""
        self.check(x)
        return self.conv_layers(x).flatten(2).transpose(1, 2)


EMBEDS.register("t2t")(T2TEmbed)
EMBEDS.register("cct")(CCTTokenizer)
EMBEDS.register("cct3d")(CCTTokenizer3d)
