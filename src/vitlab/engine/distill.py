"""Knowledge distillation in ``vitlab train`` (``--distill hard|soft --teacher PATH``), as DeiT does it.

"Training data-efficient image transformers & distillation through attention" (Touvron et al.,
ICML 2021; reference: facebookresearch/deit, ``losses.py``).  The teacher (any vitlab checkpoint,
in eval mode, without gradients) sees the same augmented (and mixed) batch as the student.  With
``Z_s`` the student's class logits, ``Z_d`` its distillation logits (a distilled DeiT's second head;
for any other student the same single head), ``Z_t`` the teacher's logits, ``y`` the (smoothed or
mixed) target and ``L_base`` the run's criterion:

* hard: ``(1 - a) * L_base(Z_s, y) + a * CE(Z_d, argmax Z_t)`` (DeiT's default, a = 0.5 gives the
  paper's ``1/2 CE + 1/2 CE``);
* soft: ``(1 - a) * L_base(Z_s, y) + a * tau^2 * KL(softmax(Z_t / tau) || softmax(Z_d / tau))``, the KL
  summed over the batch and the classes and divided by ``Z_d.numel()`` = batch x classes (the
  reference's normalisation, kept from PyTorch's legacy ``size_average``; see deit issue 61): a
  ``1 / num_classes`` smaller term than a per-sample mean.

The reference's defaults are ``a = 0.5``, ``tau = 1``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import UserError

__all__ = ["distillation_loss", "Distiller", "load_teacher", "teacher_path", "build_distiller"]

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def distillation_loss(outputs: Outputs, teacher_logits: torch.Tensor, target: torch.Tensor, base_criterion,
                      mode: str, alpha: float = 0.5, tau: float = 1.0) -> torch.Tensor:
    """DeiT's ``DistillationLoss``: ``outputs`` is the student's ``(class, distillation)`` logits or one
    tensor used for both terms."""
    cls, dist = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
    cls, dist, teacher_logits = cls.float(), dist.float(), teacher_logits.float()
    base = base_criterion(cls, target)
    if mode == "soft":
        kd = F.kl_div(F.log_softmax(dist / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                      reduction="sum", log_target=True) * (tau * tau) / dist.numel()
    elif mode == "hard":
        kd = F.cross_entropy(dist, teacher_logits.argmax(dim=1))
    else:
        raise UserError(f"--distill {mode!r}: expected hard or soft")
    return base * (1 - alpha) + kd * alpha


class Distiller:
    """The training criterion with a teacher: ``distiller(x, outputs, target) -> (loss, logits)``
    where ``logits`` (the mean of the two heads) is what the accuracy counts."""

    def __init__(self, teacher: nn.Module, base_criterion, mode: str, alpha: float = 0.5, tau: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.base_criterion, self.mode, self.alpha, self.tau = base_criterion, mode, float(alpha), float(tau)

    def __call__(self, x: torch.Tensor, outputs: Outputs, target: torch.Tensor):
        self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss = distillation_loss(outputs, teacher_logits, target, self.base_criterion, self.mode, self.alpha,
                                 self.tau)
        logits = (outputs[0] + outputs[1]) / 2 if isinstance(outputs, (tuple, list)) else outputs
        return loss, logits


def teacher_path(path: str) -> str:
    """A checkpoint file as given; a run directory: its ``checkpoints/best.pt`` (else ``last.pt``);
    a model directory (``config.json`` + weights) as given."""
    if os.path.isdir(path):
        from vitlab.engine.checkpoint import run_dir_checkpoint

        ck = run_dir_checkpoint(path)
        if ck:
            return ck
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        raise UserError(f"--teacher {path}: a directory with neither checkpoints/best.pt, checkpoints/last.pt nor "
                        f"config.json")
    if not os.path.isfile(path):
        raise UserError(f"--teacher {path}: no such checkpoint file or run directory")
    return path


def _teacher_spec(path: str, model_name: Optional[str]) -> Tuple[str, Dict[str, Any], Any]:
    """``(model name, model arguments, state dict)`` of the teacher held by ``path``."""
    from vitlab.engine.checkpoint import load_checkpoint
    from vitlab.interop.checkpoint import read_model_config, read_state_dict

    if os.path.isfile(path) and path.endswith((".pt", ".pth", ".tar")):
        ckpt = load_checkpoint(path)
        if ckpt.get("vitlab_pretrain"):
            raise UserError(f"--teacher {path}: a vitlab pretrain checkpoint has no classifier; fine-tune it with "
                            f"vitlab train first")
        if isinstance(ckpt, dict) and "config" in ckpt:
            cfg = ckpt["config"]
            if model_name and model_name != cfg["model"]:
                raise UserError(f"--teacher-model {model_name}: the checkpoint {path} holds model {cfg['model']}")
            kw = dict(ckpt.get("model_kwargs") or cfg.get("model_kwargs") or {})
            kw.update(img_size=ckpt["img_size"], in_chans=ckpt["in_chans"], num_classes=ckpt["num_classes"])
            return cfg["model"], kw, ckpt["model"]
    mcfg = read_model_config(path)
    name = model_name or mcfg.get("architecture")
    if not name:
        raise UserError(f"--teacher {path}: bare weights without config.json; name the model with --teacher-model")
    return name, dict(mcfg.get("model_args") or {}), read_state_dict(path)


def load_teacher(path: str, model_name: Optional[str], num_classes: int, img_size: int, in_chans: int,
                 device: torch.device) -> nn.Module:
    """The frozen teacher in eval mode on ``device``; refuses one of another class count or input."""
    from vitlab.models.factory import create_model

    path = teacher_path(path)
    name, kw, state = _teacher_spec(path, model_name)
    kw.setdefault("img_size", img_size)
    kw.setdefault("in_chans", in_chans)
    kw.setdefault("num_classes", num_classes)
    if int(kw["num_classes"]) != num_classes:
        raise UserError(f"--teacher {path}: the teacher has {kw['num_classes']} classes, the student {num_classes}")
    if int(kw["in_chans"]) != in_chans or int(kw["img_size"]) != img_size:
        raise UserError(f"--teacher {path}: the teacher takes {kw['in_chans']}-channel {kw['img_size']} px images, "
                        f"the student {in_chans}-channel {img_size} px")
    try:
        teacher = create_model(name, **kw)
        teacher.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--teacher {path}: cannot build model {name} from it ({first})") from None
    return teacher.to(device).eval().requires_grad_(False)


def build_distiller(cfg, model: nn.Module, num_classes: int, settings: Dict[str, Any], device: torch.device,
                    criterion) -> Optional[Distiller]:
    """``None`` without ``--distill``; else the teacher loaded and a distilled DeiT student switched
    to return both heads in training mode."""
    if not cfg.distill or cfg.distill == "none":
        return None
    teacher = load_teacher(cfg.teacher, cfg.teacher_model, num_classes, settings["img_size"], settings["in_chans"],
                           device)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    return Distiller(teacher, criterion, cfg.distill, cfg.distill_alpha, cfg.distill_tau)
