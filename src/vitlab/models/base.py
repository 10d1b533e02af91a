"""The model contract shared by every vitlab backbone.

Training, analysis and interop use only this surface:

* ``forward(x) -> logits``, ``forward_features(x)``, ``forward_head(features, pre_logits=False)``
* ``forward_intermediates(x) -> list[Intermediate]``: per-block outputs as spatial maps
* attention probabilities through :func:`vitlab.layers.record_attention` (a context manager)
* ``no_weight_decay() -> set[str]`` of parameter names, ``default_cfg`` (a dict)
* ``check_input(x)``: a clear error for a wrong channel count or image size
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

__all__ = ["Intermediate", "VitlabModel", "IMAGENET_MEAN", "IMAGENET_STD"]

from vitlab.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


@dataclass
class Intermediate:
    """One entry of ``forward_intermediates``.

    ``feature`` is always a spatial map ``(B, C, H, W)`` (class/distillation tokens removed;
    they are kept in ``prefix`` as ``(B, P, C)``).  ``kind`` says what produced it:
    ``"embed"`` (patch embedding / stem), ``"attn"`` (after an attention residual),
    ``"mlp"`` (after an MLP residual), ``"conv"`` (a convolutional block),
    ``"block"`` (a whole block when halves are not separable), ``"downsample"`` (patch merging
    or a strided stage transition) or ``"norm"``.  ``stage`` is the stage index (0 for
    isotropic models).
    """

    name: str
    kind: str
    feature: torch.Tensor
    prefix: Optional[torch.Tensor] = None
    stage: int = 0

    @property
    def spatial_shape(self) -> Tuple[int, int]:
        return tuple(self.feature.shape[-2:])  # type: ignore[return-value]

    @property
    def tokens(self) -> torch.Tensor:
        """Patch tokens ``(B, H*W, C)`` in raster order."""
        return self.feature.flatten(2).transpose(1, 2)

    @property
    def all_tokens(self) -> torch.Tensor:
        """Prefix tokens followed by patch tokens ``(B, P + H*W, C)``."""
        if self.prefix is None:
            return self.tokens
        return torch.cat([self.prefix, self.tokens], dim=1)


def tokens_to_map(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens -> ``(B, C, H, W)`` map."""
    b, n, c = tokens.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"cannot reshape {n} tokens to a {h}x{w} map")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class VitlabModel(nn.Module):
    """Base class: holds ``default_cfg`` and the shared parts of the contract."""

    default_cfg: Dict[str, Any]
    num_classes: int
    in_chans: int = 3
    num_features: int

    # substrings of parameter names that never get weight decay (besides all 1-D tensors)
    _no_weight_decay_keys: Tuple[str, ...] = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor) -> List[Intermediate]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters excluded from weight decay: every 1-D tensor (biases, norm
        scales, shortcut/FeatScale/AttnScale gains) and position tables / special tokens."""
        return {
            n for n, p in self.named_parameters()
            if p.ndim <= 1 or any(k in n for k in self._no_weight_decay_keys)
        }

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"create the model with in_chans={x.shape[1]} to change it"
            )

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.default_cfg = {**self.default_cfg, "num_classes": num_classes}

    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def name(self) -> str:
        return self.default_cfg.get("architecture", type(self).__name__)


def make_default_cfg(architecture: str, img_size: int, num_classes: int, in_chans: int = 3,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra: Any) -> Dict[str, Any]:
    """A timm-style ``default_cfg``: what a data pipeline needs to feed the model."""
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    cfg = dict(architecture=architecture, input_size=(in_chans, img_size, img_size), num_classes=num_classes,
               mean=tuple(mean), std=tuple(std), interpolation="bicubic", crop_pct=0.875)
    cfg.update(extra)
    return cfg


def register_recipe(model_cls, name: str, defaults: Dict[str, Any], doc: str, **cfg: Any) -> None:
    """Register ``name`` as a paper recipe: ``model_cls(**defaults)`` with the caller's overrides
    winning, and a ``default_cfg`` (extra entries ``cfg``, e.g. ``crop_pct``) built from the
    resolved image size, class count and channels."""
    from vitlab.registry import register_model

    def factory(**overrides: Any):
        kw = {**defaults, **overrides}
        default_cfg = make_default_cfg(name, kw.get("img_size", 224), kw.get("num_classes", 1000),
                                       kw.get("in_chans", 3), **cfg)
        return model_cls(architecture=name, default_cfg=default_cfg, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.model_cls = model_cls
    register_model(factory)
