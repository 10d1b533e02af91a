"""AlterNet: a pre-activation ResNet whose stages end in window-attention (MSA) blocks.

"How Do Vision Transformers Work?" (Park & Kim, ICLR 2022), spec ``how_vits_work.md`` section 3:
Alter-ResNet-50 has 3, 4, 6, 4 bottleneck blocks per stage; a stage with ``n`` blocks of which
``m`` are MSA blocks runs ``n - 2m`` conv blocks then ``m`` times (conv, MSA).  The MSA block is
``x + DropPath(to_out(WindowMSA(BN(conv1x1(GELU(BN(x)))))))`` with non-overlapping ``p x p``
windows, head dim 64, heads 3/6/12/24 per stage and a ``(2p-1) x (2p-1)`` relative position bias
shared by all heads.  ``msa_counts`` picks the layout: ``(0, 1, 3, 2)`` (released code default,
``alternet50``) or ``(0, 1, 1, 2)`` (paper's CIFAR-100 layout, ``alternet50_cifar``).

Parts: ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)``: window coordinates) choose the
MSA's attention as in every family
(``softmax`` default, ``cosine``, ``attnscale``; a linear-cost core such as ``focused_linear``
attends over the whole map, without the window table; a non-attention mixer such as ``pooling`` is
followed by a projection to the block width; FLatten's depthwise conv acts per head, on the
64-channel head dim).  ``shortcut`` scales every residual branch (conv and MSA) per channel,
``featscale`` adds FeatScale to every MSA branch (mean over the whole map), ``init`` as in
:mod:`vitlab.models.resnet`; the norm is BatchNorm (``norm=`` other than ``batchnorm`` raises).

State-dict keys: the pre-activation ResNet's (``stem.0``, ``layer{i}.{j}.norm1/conv1/...``,
``norm``, ``fc``) and, for MSA blocks, ``norm1``, ``conv``, ``norm2``,
``attn.{q, kv, proj, relative_position_bias_table}``, ``downsample``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import DropPath, FeatScale, MixerSpec, TokenLayout, create_shortcut
from vitlab.models.resnet import CIFAR100_MEAN, CIFAR100_STD, PreActBottleneck, PreActResNet, check_cnn_parts
from vitlab.models.base import make_default_cfg
from vitlab.models.factory import register_model

__all__ = ["alternet_attention", "MSABlock", "AlterNet", "msa_layout"]


def msa_layout(n: int, m: int) -> Tuple[str, ...]:
    """Block kinds of a stage with ``n`` blocks, ``m`` of them MSA: ``n - 2m`` convs then ``m`` x
    (conv, MSA) (Park & Kim, ICLR 2022, released code)."""
    if m < 0 or 2 * m > n:
        raise ValueError(f"a stage of {n} blocks can hold 0..{n // 2} MSA blocks (each follows a conv block), "
                         f"got {m}")
    return ("conv",) * (n - 2 * m) + ("conv", "attn") * m


def alternet_attention(spec: MixerSpec, width: int, dim: int, heads: int, size: int, head_dim: int = 64,
                       window_size: int = 7) -> nn.Module:
    """AlterNet's token mixer on a ``size x size`` map of ``width`` channels, output ``dim`` channels.

    Attention (Park & Kim, ICLR 2022): ``p x p`` windows, q/k/v by bias-free projections (``q``,
    ``kv``) to ``heads * head_dim`` channels, a relative position table shared by all heads
    (init N(0, 0.02^2)), output projection ``proj`` with bias.  A linear-cost core attends over the
    whole map (no table), as FLatten does in Swin.  A non-attention mixer (pooling) mixes the
    ``width`` channels and a 1x1 projection ``proj`` brings them to ``dim``."""
    layout = TokenLayout((size, size))
    if not spec.attention:
        return ProjectedMixer(spec.build(width, heads, layout), width, dim)
    att = dict(head_dim=head_dim, out_dim=dim, projection=("q_kv", dict(qkv_bias=False)))
    if not spec.linear_cost:
        if size % window_size:
            raise ValueError(f"window_size={window_size} does not divide a {size}x{size} map; choose a window "
                             f"dividing every attention stage's map (e.g. window_size=4 for 32x32 inputs)")
        att.update(grouping=("window", dict(window_size=window_size)),
                   position=(("relative", dict(shared_heads=True)),))
    return spec.build(width, heads, layout, **att)


class ProjectedMixer(nn.Module):
    """A token mixer followed by a projection ``proj`` to ``out_dim`` channels."""

    def __init__(self, mixer: nn.Module, dim: int, out_dim: int):
        super().__init__()
        self.mixer, self.proj = mixer, nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.proj(self.mixer(x, layout))


class MSABlock(nn.Module):
    """AlterNet's pre-activation MSA block (Park & Kim, ICLR 2022): ``BN -> GELU -> 1x1 conv (C ->
    C/4, no bias) -> BN -> window MSA -> projection back to C``, identity shortcut, DropPath;
    optional FeatScale and shortcut scale on the branch."""

    wiring = "pre"  # pre-activation: the norm opens the one residual branch

    def __init__(self, dim: int, heads: int, size: int, spec: MixerSpec, head_dim: int = 64, window_size: int = 7,
                 drop_path: float = 0.0, featscale: bool = False, branch_scale: Optional[nn.Module] = None):
        super().__init__()
        width = dim // 4
        self.norm1 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(dim, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.layout = TokenLayout((size, size))
        self.attn = alternet_attention(spec, width, dim, heads, size, head_dim, window_size)
        self.featscale = FeatScale(dim) if featscale else None
        self.scale = branch_scale if branch_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm2(self.conv(self.act(self.norm1(x))))
        b, c, h, w = t.shape
        if (h, w) != self.layout.grid:
            raise ValueError(f"this AlterNet block was built for a {self.layout.grid} map, got {(h, w)}: create the "
                             "model with the img_size of its inputs")
        t = self.attn(t.flatten(2).transpose(1, 2), self.layout)
        if self.featscale is not None:
            t = self.featscale(t)
        y = self.scale(t).transpose(1, 2).reshape(b, -1, h, w)
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
                 core: Optional[str] = None, modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 branch_scale: Optional[str] = None,
                 wiring: str = "pre", architecture: str = "alternet", **kwargs: Any):
        if wiring != "pre":
            raise ValueError(f"wiring={wiring!r} is not defined for AlterNet: its MSA blocks are pre-activation ResNet "
                             "blocks (BatchNorm -> GELU -> 1x1 conv -> BatchNorm -> MSA, one residual branch); "
                             "use wiring='pre'")
        if len(tuple(msa_counts)) != 4 or len(tuple(heads)) != 4:
            raise ValueError(f"msa_counts and heads need 4 values (one per stage), got {tuple(msa_counts)} and "
                             f"{tuple(heads)}")
        self._layouts = [msa_layout(n, m) for n, m in zip(layers, msa_counts)]
        self._msa_cfg = dict(heads=tuple(heads), head_dim=head_dim, window_size=window_size,
                             shortcut_init=shortcut_init,
                             spec=MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position))
        super().__init__(layers=layers, mixer=mixer, shortcut=branch_scale or shortcut, featscale=featscale,
                         architecture=architecture, **kwargs)

    def _check_parts(self, architecture, mixer, norm, shortcut, featscale) -> None:
        check_cnn_parts(architecture, None, norm, shortcut, featscale, allow_shortcut=True)

    def _make_block(self, stage, index, n, inplanes, planes, stride, drop_path, size, total, mixer="softmax",
                    shortcut="plain", featscale=False, **_):
        cfg = self._msa_cfg
        dim = planes * 4
        scale = create_shortcut(shortcut, dim, cfg["shortcut_init"], depth=total) if shortcut != "plain" else None
        if self._layouts[stage][index] == "conv":
            return PreActBottleneck(inplanes, planes, stride, drop_path, branch_scale=scale), "conv"
        return MSABlock(dim, cfg["heads"][stage], size, cfg["spec"], cfg["head_dim"], cfg["window_size"], drop_path,
                        featscale, scale), "attn"


def _register(name: str, defaults: Dict[str, Any], doc: str, **cfg: Any) -> None:
    def factory(**overrides: Any) -> AlterNet:
        kw = {**defaults, **overrides}
        c = dict(cfg)
        mean, std = c.pop("mean", None), c.pop("std", None)
        default_cfg = make_default_cfg(name, kw.get("img_size", 224), kw.get("num_classes", 1000),
                                       kw.get("in_chans", 3), **({"mean": mean, "std": std} if mean else {}), **c)
        return AlterNet(architecture=name, default_cfg=default_cfg, **kw)

    factory.model_cls = AlterNet  # its keyword arguments: AlterNet's and PreActResNet's
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
