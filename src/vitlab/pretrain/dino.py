"""DINO: "Emerging Properties in Self-Supervised Vision Transformers" (Caron et al., ICCV 2021).

Built on the model contract only (reference: facebookresearch/dino, ``main_dino.py``,
``vision_transformer.py``, ``utils.py``):

* student and teacher: the same backbone (features = ``forward_head(forward_features(x),
  pre_logits=True)``, the pooled pre-logits) and projection head (:class:`DINOHead`: 3-layer MLP with
  GELU, an L2-normalised bottleneck, a weight-normalised last layer whose norm ``g`` is fixed to 1);
  crops of one size run through the backbone together (:class:`MultiCropWrapper`);
* the teacher sees the 2 global crops, the student every crop (global + local, the local ones at a
  smaller size: the backbone resamples its position table on the fly, ``dynamic_img_size``); the loss
  is the cross-entropy between the teacher's centred, sharpened softmax (temperature warmed up
  linearly per epoch, :func:`teacher_temperatures`) and the student's softmax (temperature 0.1),
  over every pair of different views, averaged (:class:`DINOLoss`);
* the centre is an EMA of the teacher's batch mean (momentum 0.9), all-reduced over ranks;
* the teacher is an EMA of the student with momentum following a cosine from 0.996 to 1 over all
  iterations (:func:`cosine_schedule`); it gets no gradient;
* the student's gradients are clipped per parameter to norm 3 (:func:`clip_gradients`) and the last
  layer's gradients are dropped during the first epoch (:func:`cancel_last_layer_gradients`).
"""
from __future__ import annotations

import copy
import math
from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "MultiCropWrapper", "DINOLoss", "DINO", "teacher_temperatures", "cosine_schedule",
           "clip_gradients", "cancel_last_layer_gradients", "ema_update"]


class DINOHead(nn.Module):
    """MLP (``nlayers`` linears, GELU) to a ``bottleneck_dim`` vector, L2-normalised, then a
    weight-normalised linear layer to ``out_dim`` (its norm fixed to 1 with ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: List[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """``backbone`` on each run of same-size crops at once, then ``head`` on all the features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        crops = [crops] if torch.is_tensor(crops) else list(crops)
        out, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            out.append(self.features(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(out))


def teacher_temperatures(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> List[float]:
    """Per epoch: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs`` (``numpy.linspace``,
    both ends included), then ``temp``."""
    warm = [warmup_temp + (temp - warmup_temp) * i / (warmup_epochs - 1) for i in range(warmup_epochs)] \
        if warmup_epochs > 1 else [temp] * warmup_epochs
    return warm + [temp] * max(0, epochs - warmup_epochs)


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int) -> List[float]:
    """The reference's ``cosine_scheduler`` without warmup: iteration ``i`` of ``N`` gets
    ``final + (base - final) * (1 + cos(pi * i / N)) / 2``."""
    n = epochs * steps_per_epoch
    return [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> List[float]:
    """Scale each parameter's gradient to norm at most ``clip`` (per parameter, not global)."""
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            norm = float(p.grad.norm(2))
            norms.append(norm)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    return norms


def cancel_last_layer_gradients(epoch: int, model: nn.Module, freeze_epochs: int) -> None:
    """During the first ``freeze_epochs`` epochs the head's last layer does not move."""
    if epoch >= freeze_epochs:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student``, parameter by parameter."""
    for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's global views and the student's other views."""

    def __init__(self, out_dim: int, ncrops: int, temperatures: Sequence[float], student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.temperatures = list(temperatures)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_entropy = float("nan")

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        student = (student_out / self.student_temp).chunk(self.ncrops)
        temp = self.temperatures[min(epoch, len(self.temperatures) - 1)]
        probs = F.softmax((teacher_out - self.center) / temp, dim=-1).detach()
        self.teacher_entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        total, terms = 0.0, 0
        for iq, q in enumerate(probs.chunk(2)):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_out) * world)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


class DINO(nn.Module):
    """Student and EMA teacher (backbone + :class:`DINOHead`) with :class:`DINOLoss`.
    ``forward(crops, epoch)`` returns the loss; the runner calls :meth:`after_backward` before and
    :meth:`after_step` after each optimizer step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, embed_dim: int, ncrops: int, epochs: int,
                 steps_per_epoch: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 norm_last_layer: bool = True, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1, center_momentum: float = 0.9,
                 momentum_teacher: float = 0.996, clip_grad: float = 3.0, freeze_last_layer: int = 1):
        super().__init__()
        head = DINOHead(embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.student = MultiCropWrapper(student, head)
        self.teacher = MultiCropWrapper(teacher, copy.deepcopy(head))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        temps = teacher_temperatures(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)
        self.loss = DINOLoss(out_dim, ncrops, temps, student_temp, center_momentum)
        self.momentum = cosine_schedule(momentum_teacher, 1.0, epochs, steps_per_epoch)
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer

    @property
    def encoder(self) -> nn.Module:
        """The backbone that is kept: the teacher's, as the reference evaluates."""
        return self.teacher.backbone

    def forward(self, crops: Sequence[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = self.teacher(list(crops[:2]))
        student_out = self.student(list(crops))
        return self.loss(student_out.float(), teacher_out.float(), epoch)

    def after_backward(self, epoch: int) -> None:
        if self.clip_grad:
            clip_gradients(self.student, self.clip_grad)
        cancel_last_layer_gradients(epoch, self.student, self.freeze_last_layer)

    def after_step(self, iteration: int) -> None:
        """EMA update of the teacher after optimizer step ``iteration`` (0-based)."""
        m = self.momentum[min(iteration, len(self.momentum) - 1)]
        ema_update(self.student, self.teacher, m)

    def stats(self) -> dict:
        return {"teacher_entropy": self.loss.teacher_entropy}
