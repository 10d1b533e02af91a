"""Optimiser and learning-rate schedule.

* parameter groups that skip weight decay for everything ``model.no_weight_decay()`` names
  (biases, norm gains, position tables, class tokens), as in DeiT;
* optional layer-wise lr decay ("BEiT: BERT Pre-Training of Image Transformers", Bao et al.,
  ICLR 2022): block ``i`` of ``L`` gets ``lr * decay ** (L + 1 - layer_id)``;
* the optimiser itself from timm's ``create_optimizer_v2`` (AdamW, SGD, ...);
* the schedule from timm's ``create_scheduler_v2``: cosine decay with linear warmup by default
  ("SGDR", Loshchilov & Hutter, ICLR 2017), or tanh, step, multistep, poly, constant, wsd,
  plateau; stepped per optimizer update; a warmup of zero is allowed.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "layer_ids", "SCHEDULES", "optimizer_names"]


def optimizer_names():
    """Every optimizer name timm's ``create_optimizer_v2`` takes (adamw, sgd, lamb, lion, ...)."""
    from timm.optim import list_optimizers

    return list_optimizers()

_BLOCK = re.compile(r"^(.*?\bblocks\.\d+)\.")


def layer_ids(model: nn.Module) -> Dict[str, int]:
    """Parameter name -> layer id: 0 before the first block (embeddings, tokens), ``1..L`` for
    the blocks in module order (works for isotropic and hierarchical models), ``L + 1`` after.
    A model with timm's ``group_matcher(coarse=False)`` is grouped by it (timm's
    ``param_groups_layer_decay`` rule); otherwise by the ``blocks.<i>`` names."""
    if hasattr(model, "group_matcher"):
        from timm.models._manipulate import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=False), reverse=False)
        order = {g: i for i, g in enumerate(sorted(groups))}
        return {n: order[g] for g, names in groups.items() for n in names}
    names = [n for n, _ in model.named_parameters()]
    blocks: List[str] = []
    for n in names:
        m = _BLOCK.match(n)
        if m and m.group(1) not in blocks:
            blocks.append(m.group(1))
    ids, seen_block = {}, False
    for n in names:
        m = _BLOCK.match(n)
        if m:
            ids[n] = blocks.index(m.group(1)) + 1
            seen_block = True
        else:
            ids[n] = len(blocks) + 1 if seen_block else 0
    return ids


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                 weight_decay_1d: float = 0.0) -> List[Dict[str, Any]]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ids = layer_ids(model) if layer_decay is not None else {}
    top = max(ids.values()) if ids else 0
    groups: Dict[Any, Dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = n in skip or p.ndim <= 1
        lid = ids.get(n, 0)
        key = (no_wd, lid)
        if key not in groups:
            g: Dict[str, Any] = {"params": [], "weight_decay": weight_decay_1d if no_wd else weight_decay, "param_names": []}
            if layer_decay is not None:
                g["lr_scale"] = layer_decay ** (top - lid)
            groups[key] = g
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(n)
    out = list(groups.values())
    for g in out:
        g.pop("param_names")
    return out


def fused_ok(model: nn.Module) -> bool:
    """torch's fused Adam/AdamW kernels take floating-point parameters on CPU, CUDA and a few other
    devices (``torch.optim.optimizer._get_fused_kernels_supported_devices``)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and p.device.type in devices for p in model.parameters())


def build_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas=(0.9, 0.999), layer_decay: Optional[float] = None, weight_decay_1d: float = 0.0,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, weight_decay, layer_decay, weight_decay_1d)
    kwargs: Dict[str, Any] = {"momentum": momentum}  # timm passes it only to optimizers that take it
    if ("adam" in opt and "adan" not in opt) or "lamb" in opt:
        kwargs["betas"] = tuple(betas)
        kwargs["eps"] = eps
    if opt in ("adamw", "adam") and fused_ok(model):
        kwargs["fused"] = True  # one kernel per step instead of ~10 per tensor: ViT-S on CPU 88 -> 22 ms
    optimizer = create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)
    for g in optimizer.param_groups:  # timm's schedulers apply lr_scale; set it for step 0 too
        g.setdefault("lr_scale", 1.0)
    return optimizer


SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "plateau")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int):
    """timm's ``create_scheduler_v2`` stepped per optimizer update (``plateau``: per epoch, on the
    validation metric).  Epoch settings (warmup, decay interval, milestones) are converted to
    whole updates; cooldown epochs run at ``min_lr`` after the schedule."""
    from timm.scheduler import create_scheduler_v2

    if cfg.sched not in SCHEDULES:
        from vitlab.errors import UserError

        raise UserError(f"--sched must be one of {', '.join(SCHEDULES)}, got {cfg.sched!r}")
    spe = 1 if cfg.sched == "plateau" else steps_per_epoch
    per_update = cfg.sched != "plateau"
    kw = dict(sched=cfg.sched, num_epochs=max(1, cfg.epochs * spe), min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
              warmup_epochs=int(round(cfg.warmup_epochs * spe)), decay_rate=cfg.decay_rate,
              decay_milestones=[int(round(m * spe)) for m in cfg.decay_milestones],
              patience_epochs=cfg.patience_epochs, step_on_epochs=not per_update,
              updates_per_epoch=1 if per_update else 0, plateau_mode="min" if cfg.eval_metric == "nll" else "max")
    if cfg.decay_epochs is not None:
        kw["decay_epochs"] = cfg.decay_epochs if 0 < cfg.decay_epochs < 1 else cfg.decay_epochs * spe
    sched, _ = create_scheduler_v2(optimizer, **kw)
    if per_update:
        sched.step_update(0)
    return sched
