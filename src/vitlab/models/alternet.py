"""AlterNet: a pre-activation ResNet whose stages end in window-attention (MSA) blocks.

"How Do Vision Transformers Work?" (Park & Kim, ICLR 2022), spec ``how_vits_work.md`` section 3:
Alter-ResNet-50 has 3, 4, 6, 4 bottleneck blocks per stage; a stage with ``n`` blocks of which
``m`` are MSA blocks runs ``n - 2m`` conv blocks then ``m`` times (conv, MSA).  The MSA block is
``x + DropPath(to_out(WindowMSA(BN(conv1x1(GELU(BN(x)))))))`` with non-overlapping ``p x p``
windows, head dim 64, heads 3/6/12/24 per stage and a ``(2p-1) x (2p-1)`` relative position bias
shared by all heads.  ``msa_counts`` picks the layout: ``(0, 1, 3, 2)`` (released code default,
``alternet50``) or ``(0, 1, 1, 2)`` (paper's CIFAR-100 layout, ``alternet50_cifar``).

Parts: ``mixer`` is the MSA core (``softmax`` default, ``cosine`` = LipsFormer's scaled cosine
attention, ``attnscale`` = softmax + AttnScale); ``focused_linear`` raises (its rank-restoring
depthwise conv assumes the inner dim equals the token dim, which AlterNet's 64-per-head
projection breaks).  ``shortcut`` scales every residual branch (conv and MSA) per channel,
``featscale`` adds FeatScale to every MSA branch (mean over the whole map), ``init`` as in
:mod:`vitlab.models.resnet`; the norm is BatchNorm (``norm=`` other than ``batchnorm`` raises).

State-dict keys: the pre-activation ResNet's (``stem.0``, ``layer{i}.{j}.norm1/conv1/...``,
``norm``, ``fc``) and, for MSA blocks, ``norm1``, ``conv``, ``norm2``,
``attn.{to_q, to_kv, to_out, relative_position_bias_table}``, ``downsample``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.layers import AttnScale, DropPath, FeatScale, create_shortcut
from vitlab.layers.recording import RecordsAttention
from vitlab.models.resnet import CIFAR100_MEAN, CIFAR100_STD, PreActBottleneck, PreActResNet, check_cnn_parts
from vitlab.models.base import make_default_cfg
from vitlab.registry import register_model

__all__ = ["WindowAttention2d", "MSABlock", "AlterNet", "msa_layout"]

_ALTERNET_MIXERS = ("softmax", "cosine", "attnscale")


def msa_layout(n: int, m: int) -> Tuple[str, ...]:
    """Block kinds of a stage with ``n`` blocks, ``m`` of them MSA: ``n - 2m`` convs then ``m`` x
    (conv, MSA) (Park & Kim, ICLR 2022, released code)."""
    if m < 0 or 2 * m > n:
        raise ValueError(f"a stage of {n} blocks can hold 0..{n // 2} MSA blocks (each follows a conv block), "
                         f"got {m}")
    return ("conv",) * (n - 2 * m) + ("conv", "attn") * m


class WindowAttention2d(RecordsAttention, nn.Module):
    """Local window MSA on a ``(B, C, H, W)`` map (Park & Kim, ICLR 2022): ``p x p`` windows,
    q/k/v by bias-free 1x1 convs to ``heads * head_dim`` channels, a relative position bias table
    ``(2p-1, 2p-1)`` shared by all heads (init N(0, 0.02^2)), output 1x1 conv with bias.
    ``mixer``: ``softmax`` | ``cosine`` (logits ``tau * cos(q, k)``, "LipsFormer", Qi et al.,
    ICLR 2023) | ``attnscale`` (Wang et al., ICLR 2022).  Attention never spans more than one window."""

    def __init__(self, dim_in: int, dim_out: int, heads: int, head_dim: int = 64, window_size: int = 7,
                 mixer: str = "softmax", tau: float = 10.0, attn_drop: float = 0.0, **_unused: Any):
        super().__init__()
        if mixer not in _ALTERNET_MIXERS:
            why = (" (its rank-restoring depthwise conv needs the inner dim to equal the token dim; AlterNet "
                   "projects to 64 channels per head)") if mixer == "focused_linear" else ""
            raise ValueError(f"AlterNet's window attention supports mixer in {_ALTERNET_MIXERS}, got {mixer!r}{why}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.heads, self.head_dim, self.window_size, self.mixer = heads, head_dim, window_size, mixer
        inner = heads * head_dim
        self.scale = float(tau) if mixer == "cosine" else head_dim ** -0.5
        self.to_q = nn.Conv2d(dim_in, inner, 1, bias=False)
        self.to_kv = nn.Conv2d(dim_in, inner * 2, 1, bias=False)
        self.to_out = nn.Conv2d(inner, dim_out, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_scale = AttnScale(heads) if mixer == "attnscale" else None
        p = window_size
        self.relative_position_bias_table = nn.Parameter(torch.randn(2 * p - 1, 2 * p - 1) * 0.02)
        ys, xs = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        c = torch.stack([ys.flatten(), xs.flatten()])  # 2, p*p
        rel = c[:, :, None] - c[:, None, :] + p - 1  # query i, key j
        self.register_buffer("relative_position_index", rel, persistent=False)

    def relative_bias(self) -> torch.Tensor:
        idx = self.relative_position_index
        return self.relative_position_bias_table[idx[0], idx[1]]  # (p*p, p*p)

    def _windows(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(B, heads*d, H, W)`` -> ``(B*nW, heads, p*p, d)``."""
        b, p, hd = t.shape[0], self.window_size, self.head_dim
        t = t.view(b, self.heads, hd, h // p, p, w // p, p).permute(0, 3, 5, 1, 4, 6, 2)
        return t.reshape(-1, self.heads, p * p, hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.window_size
        if h % p or w % p:
            raise ValueError(f"AlterNet window attention: a {h}x{w} map is not divisible into {p}x{p} windows; "
                             f"create the model with a window_size dividing every stage's map (e.g. 4 for 32x32 "
                             f"CIFAR inputs, 7 for 224x224)")
        k, v = self.to_kv(x).chunk(2, dim=1)
        q, k, v = self._windows(self.to_q(x), h, w), self._windows(k, h, w), self._windows(v, h, w)
        if self.mixer == "cosine":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        bias = self.relative_bias().to(q.dtype)
        if self.recording:
            probs = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            if self.attn_scale is not None:
                probs = self.attn_scale(probs)
            self._record(probs)
            out = self.attn_drop(probs) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
            if self.attn_scale is not None:
                out = self.attn_scale.apply_to_output(out, v)
        # (B*nW, heads, p*p, d) -> (B, heads*d, H, W)
        out = out.view(b, h // p, w // p, self.heads, p, p, self.head_dim).permute(0, 3, 6, 1, 4, 2, 5)
        return self.to_out(out.reshape(b, self.heads * self.head_dim, h, w))


class MSABlock(nn.Module):
    """AlterNet's pre-activation MSA block (Park & Kim, ICLR 2022): ``BN -> GELU -> 1x1 conv (C ->
    C/4, no bias) -> BN -> window MSA -> 1x1 conv back to C``, identity shortcut, DropPath;
    optional FeatScale and shortcut scale on the branch."""

    def __init__(self, dim: int, heads: int, head_dim: int = 64, window_size: int = 7, mixer: str = "softmax",
                 drop_path: float = 0.0, featscale: bool = False, branch_scale: Optional[nn.Module] = None,
                 mixer_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        width = dim // 4
        self.norm1 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(dim, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.attn = WindowAttention2d(width, dim, heads, head_dim, window_size, mixer, **(mixer_kwargs or {}))
        self.featscale = FeatScale(dim) if featscale else None
        self.scale = branch_scale if branch_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm2(self.conv(self.act(self.norm1(x)))))
        t = y.permute(0, 2, 3, 1)  # channels last for the per-channel parts
        if self.featscale is not None:
            b, h, w, c = t.shape
            t = self.featscale(t.reshape(b, h * w, c)).view(b, h, w, c)
        y = self.scale(t).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class AlterNet(PreActResNet):
    """Alter-ResNet (Park & Kim, ICLR 2022); see the module docstring.

    Args beyond :class:`PreActResNet`: ``msa_counts`` (MSA blocks per stage), ``heads`` (per
    stage), ``head_dim``, ``window_size``, ``mixer``, ``shortcut``/``shortcut_init``,
    ``featscale``, ``mixer_kwargs``.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 4), msa_counts: Sequence[int] = (0, 1, 3, 2),
                 heads: Sequence[int] = (3, 6, 12, 24), head_dim: int = 64, window_size: int = 7,
                 mixer: str = "softmax", shortcut: str = "plain", shortcut_init: Optional[float] = None,
                 featscale: bool = False, mixer_kwargs: Optional[Dict[str, Any]] = None,
                 architecture: str = "alternet", **kwargs: Any):
        if len(tuple(msa_counts)) != 4 or len(tuple(heads)) != 4:
            raise ValueError(f"msa_counts and heads need 4 values (one per stage), got {tuple(msa_counts)} and "
                             f"{tuple(heads)}")
        self._layouts = [msa_layout(n, m) for n, m in zip(layers, msa_counts)]
        self._msa_cfg = dict(heads=tuple(heads), head_dim=head_dim, window_size=window_size,
                             shortcut_init=shortcut_init, mixer_kwargs=mixer_kwargs)
        super().__init__(layers=layers, mixer=mixer, shortcut=shortcut, featscale=featscale,
                         architecture=architecture, **kwargs)

    def _check_parts(self, architecture, mixer, norm, shortcut, featscale) -> None:
        check_cnn_parts(architecture, None, norm, shortcut, featscale, allow_shortcut=True)
        if mixer not in _ALTERNET_MIXERS:
            WindowAttention2d(8, 8, 1, 8, 1, mixer)  # raises the explanatory error

    def _make_block(self, stage, index, n, inplanes, planes, stride, drop_path, size, total, mixer="softmax",
                    shortcut="plain", featscale=False, **_):
        cfg = self._msa_cfg
        dim = planes * 4
        scale = create_shortcut(shortcut, dim, cfg["shortcut_init"], depth=total) if shortcut != "plain" else None
        if self._layouts[stage][index] == "conv":
            return PreActBottleneck(inplanes, planes, stride, drop_path, branch_scale=scale), "conv"
        p = cfg["window_size"]
        if size % p:
            raise ValueError(f"window_size={p} does not divide stage {stage + 1}'s {size}x{size} map; choose a "
                             f"window dividing every attention stage's map (e.g. window_size=4 for 32x32 inputs)")
        return MSABlock(dim, cfg["heads"][stage], cfg["head_dim"], p, mixer, drop_path, featscale, scale,
                        cfg["mixer_kwargs"]), "attn"


def _register(name: str, defaults: Dict[str, Any], doc: str, **cfg: Any) -> None:
    def factory(**overrides: Any) -> AlterNet:
        kw = {**defaults, **overrides}
        c = dict(cfg)
        mean, std = c.pop("mean", None), c.pop("std", None)
        default_cfg = make_default_cfg(name, kw.get("img_size", 224), kw.get("num_classes", 1000),
                                       kw.get("in_chans", 3), **({"mean": mean, "std": std} if mean else {}), **c)
        return AlterNet(architecture=name, default_cfg=default_cfg, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    register_model(factory)


_register("alternet50", dict(msa_counts=(0, 1, 3, 2)),
          "Alter-ResNet-50 (Park & Kim, ICLR 2022), released-code layout (MSA counts 0,1,3,2), window 7, ImageNet.")
_register("alternet50_cifar", dict(msa_counts=(0, 1, 1, 2), stem="cifar", img_size=32, num_classes=100,
                                   window_size=4),
          "Alter-ResNet-50 for 32x32 CIFAR-100, the paper's layout (MSA counts 0,1,1,2), window 4.",
          mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0)
_register("alternet50_code_cifar", dict(msa_counts=(0, 1, 3, 2), stem="cifar", img_size=32, num_classes=100,
                                        window_size=4),
          "Alter-ResNet-50 for 32x32 CIFAR-100 with the released-code layout (MSA counts 0,1,3,2), window 4.",
          mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0)
