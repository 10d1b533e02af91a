"""Distilled DeiT: a ViT with a distillation token and a second head.

"Training data-efficient image transformers & distillation through attention" (Touvron et al.,
ICML 2021).  A learned distillation token is appended after the class token; the class token
feeds ``head`` (trained on the labels), the distillation token feeds ``head_dist`` (trained on
the teacher's hard labels).  At evaluation the two heads' logits are averaged (as timm does);
with ``set_distilled_training(True)`` a model in training mode returns both.

Every part argument of :class:`vitlab.models.vit.VisionTransformer` (``mixer``, ``norm``,
``shortcut``, ``featscale``, ``init``, ``pos_embed`` ...) works here; ``global_pool`` must be
``token`` because the two heads read the two prefix tokens.

State-dict keys are timm's ``VisionTransformerDistilled`` keys (``cls_token``, ``dist_token``,
``pos_embed`` with 2 prefix rows, ``head``, ``head_dist``, the ViT block keys).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from vitlab.layers import init_weights
from vitlab.models.base import make_default_cfg
from vitlab.models.vit import _SIZES, VisionTransformer
from vitlab.models.factory import register_model

__all__ = ["DistilledVisionTransformer", "distilled_head"]


def distilled_head(model, x: torch.Tensor, pre_logits: bool = False
                   ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """DeiT's two heads on the class and distillation tokens ``x[:, 0]``, ``x[:, 1]``: their mean, or both
    while training with ``distilled_training`` (``model`` holds ``head``, ``head_dist``, ``head_drop``)."""
    x_cls, x_dist = model.head_drop(x[:, 0]), model.head_drop(x[:, 1])
    if pre_logits:
        return (x_cls + x_dist) / 2
    x_cls, x_dist = model.head(x_cls), model.head_dist(x_dist)
    if model.distilled_training and model.training:
        return x_cls, x_dist
    return (x_cls + x_dist) / 2


class DistilledVisionTransformer(VisionTransformer):
    """ViT + distillation token (DeiT, Touvron et al., ICML 2021); see the module docstring."""

    prefix_names = ("cls_token", "dist_token")

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("global_pool", "token") != "token":
            raise ValueError(f"a distilled DeiT needs global_pool='token' (its heads read the class and "
                             f"distillation tokens), got global_pool={kwargs['global_pool']!r}")
        if not kwargs.get("class_token", True):
            raise ValueError("a distilled DeiT needs class_token=True (head reads the class token)")
        kwargs.setdefault("architecture", "deit_distilled")
        super().__init__(*args, extra_tokens=1, **kwargs)  # the distillation token is the second prefix token
        dim = self.embed_dim
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.head_dist = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        init_weights(self.head_dist, self.init_name)
        self.distilled_training = False

    def set_distilled_training(self, enable: bool = True) -> None:
        """In training mode, return ``(class logits, distillation logits)`` instead of their mean."""
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        return distilled_head(self, x, pre_logits)

    _global_pools = ("token",)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Fresh ``head`` and ``head_dist`` for ``num_classes``."""
        super().reset_classifier(num_classes, global_pool)
        self.head_dist = nn.Identity() if num_classes <= 0 else nn.Linear(
            self.num_features, num_classes, device=self.head.weight.device, dtype=self.head.weight.dtype)

    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist


def _register(name: str, size: str, img: int = 224, **cfg: Any) -> None:
    defaults: Dict[str, Any] = dict(_SIZES[size], patch_size=16, img_size=img)

    def factory(**overrides: Any) -> DistilledVisionTransformer:
        kw = {**defaults, **overrides}
        default_cfg = make_default_cfg(name, kw.get("img_size", img), kw.get("num_classes", 1000),
                                       kw.get("in_chans", 3), **cfg)
        return DistilledVisionTransformer(architecture=name, default_cfg=default_cfg, **kw)

    factory.model_cls = VisionTransformer  # the keyword arguments it takes
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name}: distilled DeiT-{size[0].upper()}/16 at {img}x{img} (Touvron et al., ICML 2021)."
    register_model(factory)


for _size in ("tiny", "small", "base"):
    _register(f"deit_{_size}_distilled_patch16_224", _size)
_register("deit_base_distilled_patch16_384", "base", 384, crop_pct=1.0)

