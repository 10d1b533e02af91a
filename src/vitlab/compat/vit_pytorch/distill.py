"""vit-pytorch's ``vit_pytorch.distill`` (``DistillableViT``, ``DistillWrapper``) on vitlab's distilled DeiT
(:class:`~vitlab.models.deit.DistilledVisionTransformer`) and DeiT's loss (:mod:`vitlab.engine.distill`)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.compat.vit_pytorch._args import Size, refuse, set_embedding_dropout, vit_kwargs
from vitlab.compat.vit_pytorch.vit import ViT
from vitlab.engine.distill import distillation_loss
from vitlab.models.deit import DistilledVisionTransformer

__all__ = ["DistillableViT", "DistillWrapper"]


class DistillableViT(DistilledVisionTransformer):
    """A ViT with DeiT's distillation token ("Training data-efficient image transformers & distillation through
    attention", Touvron et al., ICML 2021, sec. 5) with vit-pytorch's ``ViT`` arguments (mapped as
    :class:`~vitlab.compat.vit_pytorch.vit.ViT`'s; ``pool`` must be ``'cls'``).  :meth:`to_vit` returns the
    :class:`~vitlab.compat.vit_pytorch.vit.ViT` with the shared weights.

    Follows the paper where vit-pytorch does not: the distillation token, its position row and its head
    ``head_dist`` belong to the student (vit-pytorch keeps the token and head in the ``DistillWrapper`` and gives
    the token no position), and in evaluation the model predicts the mean of the class and distillation heads
    (sec. 5.2, "joint classifiers"; vit-pytorch: the class head only).  As :class:`ViT`: no patch LayerNorms,
    qkv biases."""

    def __init__(self, *, image_size: Size, patch_size: Size, num_classes: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0):
        if pool != "cls":
            raise refuse("DistillableViT", "pool", pool, "'cls' (the heads read the class and distillation tokens)")
        self.vit_args: Dict[str, Any] = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                                             dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, pool=pool,
                                             channels=channels, dim_head=dim_head, dropout=dropout,
                                             emb_dropout=emb_dropout)
        super().__init__(**vit_kwargs("DistillableViT", image_size, patch_size, num_classes, dim, depth, heads,
                                      mlp_dim, pool, channels, dim_head, dropout, emb_dropout))
        set_embedding_dropout(self, emb_dropout)

    def to_vit(self) -> ViT:
        """The plain :class:`ViT` with this model's weights (no distillation token, row or head)."""
        vit = ViT(**self.vit_args)
        state = {k: v for k, v in self.state_dict().items() if k != "dist_token" and not k.startswith("head_dist")}
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
        vit.load_state_dict(state)
        return vit


class DistillWrapper(nn.Module):
    """DeiT's distillation loss for a :class:`DistillableViT` student (Touvron et al., ICML 2021, sec. 5) with
    vit-pytorch's arguments: ``forward(img, labels) -> loss``; ``temperature`` -> ``tau``, ``alpha``, ``hard``
    -> mode ``hard`` / ``soft``; ``mlp_layernorm`` cannot be honoured (the distillation head is a Linear).

    The loss is :func:`vitlab.engine.distill.distillation_loss` (DeiT's reference): the hard term is
    vit-pytorch's; the soft term's KL is divided by batch x classes (DeiT's reference code), where vit-pytorch
    divides by the batch only, so with the same ``alpha`` the soft term weighs ``1 / num_classes`` as much."""

    def __init__(self, *, teacher: nn.Module, student: DistillableViT, temperature: float = 1.0,
                 alpha: float = 0.5, hard: bool = False, mlp_layernorm: bool = False):
        super().__init__()
        if not isinstance(student, DistilledVisionTransformer):
            raise refuse("DistillWrapper", "student", type(student).__name__, "a DistillableViT")
        if mlp_layernorm:
            raise refuse("DistillWrapper", "mlp_layernorm", mlp_layernorm, "False (the distillation head is a Linear)")
        self.teacher, self.student = teacher, student
        self.temperature, self.alpha, self.hard = temperature, alpha, hard

    def forward(self, img: torch.Tensor, labels: torch.Tensor, temperature: Optional[float] = None,
                alpha: Optional[float] = None) -> torch.Tensor:
        """The distillation loss of the student on ``img`` (the teacher without gradients)."""
        with torch.no_grad():
            teacher_logits = self.teacher(img)
        feats = self.student.forward_features(img)  # both heads in any mode (vit-pytorch leaves the mode alone)
        outputs = (self.student.head(feats[:, 0]), self.student.head_dist(feats[:, 1]))
        return distillation_loss(outputs, teacher_logits, labels, F.cross_entropy, "hard" if self.hard else "soft",
                                 self.alpha if alpha is None else alpha,
                                 self.temperature if temperature is None else temperature)
