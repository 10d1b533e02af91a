"""ResNet-50 and the pre-activation ResNet-50, the CNN baselines of the ViT papers.

* :class:`ResNet` -- "Deep Residual Learning for Image Recognition" (He et al., CVPR 2016), the
  torchvision/timm ``resnet50`` (bottleneck with the stride on the 3x3 conv, "ResNet v1.5").
  Its state-dict keys are timm's (``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1,2,3}`` /
  ``bn{1,2,3}`` / ``downsample.{0,1}``, ``fc``), so the timm conversion is the identity.
* :class:`PreActResNet` -- "Identity Mappings in Deep Residual Networks" (He et al., ECCV 2016),
  the pre-activation baseline of "How Do Vision Transformers Work?" (Park & Kim, ICLR 2022; spec
  ``how_vits_work.md`` section 3): ``BN -> ReLU -> conv`` three times per bottleneck, projection
  shortcut on the pre-activated input, a stem without BN/ReLU, and ``BN -> ReLU -> pool -> fc``
  as classifier.  AlterNet (:mod:`vitlab.models.alternet`) builds on it.

The ViT part arguments do not apply to these all-convolution networks: ``mixer=``, ``featscale=``,
``shortcut=`` and a ``norm=`` other than ``batchnorm`` raise a ``ValueError`` that says why (use
``alternet50`` for attention blocks in a ResNet).  ``init=`` accepts ``kaiming`` (default: He
normal fan-out convs, zero-initialised last BN of each residual branch, as timm), or any vitlab
initialiser (``trunc_normal``/``xavier`` re-initialise the Linear classifier, ``spectral`` every
conv and Linear).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers import DropPath, init_weights
from vitlab.models.base import Intermediate, VitlabModel, make_default_cfg
from vitlab.models.factory import register_model

__all__ = ["Bottleneck", "ResNet", "PreActBottleneck", "PreActResNet", "check_cnn_parts"]

from vitlab.constants import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402


def check_cnn_parts(model: str, mixer: Any = None, norm: Any = None, shortcut: Any = None, featscale: Any = None,
                    allow_shortcut: bool = False) -> None:
    """Clear errors for ViT part overrides that a convolutional ResNet cannot take."""
    if mixer not in (None, "none"):
        raise ValueError(f"{model} has no token mixer (it is all convolutions), so mixer={mixer!r} cannot apply; "
                         f"use alternet50 (a ResNet with attention blocks) to try token mixers in a CNN")
    if norm not in (None, "batchnorm"):
        raise ValueError(f"{model}'s conv blocks use BatchNorm over (B, C, H, W) maps; the token norms "
                         f"(layernorm, center, rms) normalise each token over its channels and are not wired into "
                         f"ResNet blocks, so norm={norm!r} is not supported (valid: 'batchnorm')")
    if shortcut not in (None, "plain") and not allow_shortcut:
        raise ValueError(f"{model} keeps its plain identity/projection shortcuts for timm compatibility; "
                         f"shortcut={shortcut!r} is not supported here (alternet50 takes shortcut=)")
    if featscale and not allow_shortcut:
        raise ValueError(f"FeatScale re-weights an attention branch; {model} has none, so featscale=True "
                         f"cannot apply (alternet50 puts it on its attention blocks)")


class Bottleneck(nn.Module):
    """Post-activation bottleneck (He et al., CVPR 2016), stride on the 3x3 conv; names as timm's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        width, out = planes, planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                           if stride != 1 or inplanes != out else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


def _stem(stem: str, in_chans: int, bn: bool) -> List[nn.Module]:
    if stem == "imagenet":
        return [nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)]
    if stem == "cifar":
        return [nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)]
    raise ValueError(f"stem must be 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv), got {stem!r}")


class _CNNBase(VitlabModel):
    """Shared init / classifier handling of the ResNets."""

    _no_weight_decay_keys = ("relative_position", "pos_embed")

    @torch.no_grad()
    def _init(self, init: str, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()
        if init != "kaiming":
            init_weights(self, init)

    # -- the model contract: feature taps are the stem and the four stages (timm's) --------------
    _classifier = "fc"
    _stem_name = "stem"

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - per class
        raise NotImplementedError

    def _stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _feature_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        self.check_input(x)
        return x, None

    def _feature_units(self) -> List[nn.Module]:
        return [self.get_submodule(self._stem_name)] + [s for s in self._stages() if len(s)]

    def _feature_unit(self, i: int, unit: nn.Module, x: torch.Tensor, layout: None):
        if i == 0:
            return self._stem_forward(x), None
        if i == 1:
            x = self.maxpool(x)
        for blk in unit:
            x = self._block(blk, x)
        return x, None

    def _truncate_units(self, n: int) -> None:
        for k in range(n, 5):
            setattr(self, f"layer{k}", nn.Sequential())

    def _feature_info(self) -> List[Dict[str, Any]]:
        r = 4 if self.stem_type == "imagenet" else 1
        return [dict(num_chs=64, reduction=max(r // 2, 1), module=self._stem_name)] + [
            dict(num_chs=256 * 2 ** k, reduction=r * 2 ** k, module=f"layer{k + 1}")
            for k, s in enumerate(self._stages()) if len(s)]


class ResNet(_CNNBase):
    """ResNet with bottlenecks (He et al., CVPR 2016), timm-compatible; see the module docstring."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), in_chans: int = 3, num_classes: int = 1000,
                 img_size: int = 224, stem: str = "imagenet", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init: str = "kaiming", zero_init_last: bool = True, mixer: Optional[str] = None,
                 norm: Optional[str] = None, shortcut: Optional[str] = None, featscale: Optional[bool] = None,
                 architecture: str = "resnet", default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        check_cnn_parts(architecture, mixer, norm, shortcut, featscale)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem_type = stem
        self.conv1 = _stem(stem, in_chans, bn=True)[0]
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        total, k, inplanes = sum(layers), 0, 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                rate = drop_path_rate * k / max(total - 1, 1)
                blocks.append(Bottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1, drop_path=rate))
                inplanes, k = planes * 4, k + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = inplanes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init(init, zero_init_last)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img_size, num_classes, in_chans)

    _stem_name = "act1"

    @property
    def head(self) -> nn.Module:  # the contract's name for the classifier
        return self.fc

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem, then one group per block (per stage when ``coarse``)."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        x = nn.functional.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.fc(x)

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """Stem (``embed``), the max-pool (``downsample``, ImageNet stem), then every bottleneck
        (``conv``; the first block of stages 2-4 subsamples)."""
        self.check_input(x)
        x = self.act1(self.bn1(self.conv1(x)))
        out = [Intermediate("stem", "embed", x)]
        if self.stem_type == "imagenet":
            x = self.maxpool(x)
            out.append(Intermediate("maxpool", "downsample", x))
        for i, s in enumerate(self._stages()):
            for j, blk in enumerate(s):
                x = blk(x)
                out.append(Intermediate(f"layer{i + 1}.{j}", "conv", x, stage=i))
        return out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck ("Identity Mappings in Deep Residual Networks", He et al., ECCV
    2016) as in Park & Kim's code: ``BN-ReLU-1x1``, ``BN-ReLU-3x3 (stride)``, ``BN-ReLU-1x1``;
    the projection shortcut (1x1, stride) reads the pre-activated input.  ``branch_scale`` is an
    optional shortcut part (ChannelScale over channels) applied to the residual branch."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, drop_path: float = 0.0,
                 branch_scale: Optional[nn.Module] = None):
        super().__init__()
        width, out = planes, planes * self.expansion
        self.norm1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.act = nn.ReLU()
        self.downsample = nn.Conv2d(inplanes, out, 1, stride=stride, bias=False) if stride != 1 or inplanes != out \
            else None
        self.scale = branch_scale if branch_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        y = self.conv1(pre)
        y = self.conv2(self.act(self.norm2(y)))
        y = self.conv3(self.act(self.norm3(y)))
        y = self.scale(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.drop_path(y) + shortcut


class PreActResNet(_CNNBase):
    """Pre-activation ResNet (He et al., ECCV 2016) of Park & Kim (ICLR 2022); see the module
    docstring.  Subclasses (AlterNet) override :meth:`_make_block`."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), in_chans: int = 3, num_classes: int = 1000,
                 img_size: int = 224, stem: str = "imagenet", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init: str = "kaiming", mixer: Optional[str] = None, norm: Optional[str] = None,
                 shortcut: Optional[str] = None, featscale: Optional[bool] = None, architecture: str = "preact_resnet",
                 default_cfg: Optional[Dict[str, Any]] = None, **block_kwargs: Any):
        super().__init__()
        self._check_parts(architecture, mixer, norm, shortcut, featscale)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem_type = stem
        self.stem = nn.Sequential(*_stem(stem, in_chans, bn=False))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        total, k, inplanes = sum(layers), 0, 64
        size = img_size // (4 if stem == "imagenet" else 1)
        self.block_kinds: List[List[str]] = []
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks, kinds = [], []
            if i > 0:
                size = (size + 1) // 2
            for j in range(n):
                rate = drop_path_rate * k / max(total - 1, 1)
                blk, kind = self._make_block(i, j, n, inplanes, planes, 2 if (i > 0 and j == 0) else 1, rate, size,
                                             total, mixer=mixer, shortcut=shortcut, featscale=featscale,
                                             **block_kwargs)
                blocks.append(blk)
                kinds.append(kind)
                inplanes, k = planes * 4, k + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.block_kinds.append(kinds)
        self.num_features = inplanes
        self.norm = nn.BatchNorm2d(inplanes)
        self.act = nn.ReLU()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        self.init_name = init
        self._init(init, zero_init_last=False)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img_size, num_classes, in_chans)

    def _check_parts(self, architecture, mixer, norm, shortcut, featscale) -> None:
        check_cnn_parts(architecture, mixer, norm, shortcut, featscale)

    def _make_block(self, stage, index, n, inplanes, planes, stride, drop_path, size, total, **kw):
        return PreActBottleneck(inplanes, planes, stride, drop_path), "conv"

    @property
    def head(self) -> nn.Module:
        return self.fc

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier input: final BN + ReLU (sized for the last stage)."""
        return self.act(self.norm(x))

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """As timm's ResNet: the stem, one group per block (per stage when ``coarse``), the final norm last."""
        return dict(stem=r"^stem", blocks=[(r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)", None),
                                           (r"^norm", (99999,))])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        x = nn.functional.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.fc(x)

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """Stem (``embed``), the max-pool (``downsample``, ImageNet stem), every block (``conv`` or,
        in AlterNet, ``attn``), and the classifier input (``norm``: final BN + ReLU)."""
        self.check_input(x)
        x = self.stem(x)
        out = [Intermediate("stem", "embed", x)]
        if self.stem_type == "imagenet":
            x = self.maxpool(x)
            out.append(Intermediate("maxpool", "downsample", x))
        for i, s in enumerate(self._stages()):
            for j, blk in enumerate(s):
                x = blk(x)
                out.append(Intermediate(f"layer{i + 1}.{j}", self.block_kinds[i][j], x, stage=i))
        out.append(Intermediate("norm", "norm", self.act(self.norm(x)), stage=3))
        return out


# -- registered recipes -----------------------------------------------------------------------------
def _register(name: str, cls: type, defaults: Dict[str, Any], doc: str, **cfg: Any) -> None:
    def factory(**overrides: Any):
        kw = {**defaults, **overrides}
        c = dict(cfg)
        mean, std = c.pop("mean", None), c.pop("std", None)
        default_cfg = make_default_cfg(name, kw.get("img_size", 224), kw.get("num_classes", 1000),
                                       kw.get("in_chans", 3), **({"mean": mean, "std": std} if mean else {}), **c)
        return cls(architecture=name, default_cfg=default_cfg, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    register_model(factory)


_register("resnet50", ResNet, dict(layers=(3, 4, 6, 3)),
          "ResNet-50 (He et al., CVPR 2016), timm's resnet50 (v1.5).", crop_pct=0.95, interpolation="bicubic")
_register("resnet50_cifar", ResNet, dict(layers=(3, 4, 6, 3), stem="cifar", img_size=32, num_classes=100),
          "ResNet-50 with the CIFAR stem (3x3/1 conv, no max-pool) for 32x32 CIFAR-100, as in Park & Kim (2022).",
          mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0)
_register("preact_resnet50", PreActResNet, dict(layers=(3, 4, 6, 3)),
          "Pre-activation ResNet-50 (He et al., ECCV 2016), the baseline of Park & Kim (ICLR 2022).")
_register("preact_resnet50_cifar", PreActResNet, dict(layers=(3, 4, 6, 3), stem="cifar", img_size=32,
                                                      num_classes=100),
          "Pre-activation ResNet-50 with the CIFAR stem for 32x32 CIFAR-100 (Park & Kim, ICLR 2022).",
          mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0)

