"""Build what a run needs from a :class:`TrainConfig`: data settings resolved from the data and
the model's ``default_cfg``, data loaders, the model (optionally fine-tuned from weights on disk),
optimiser, schedule, loss, Mixup/CutMix and EMA."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from vitlab.engine.config import TrainConfig
from vitlab.errors import UserError

__all__ = ["data_settings", "build_model", "build_data", "build_parts", "Data", "Parts", "model_default_cfg"]


def _auto_patch(img_size: int) -> int:
    """Patch size of the default model on an unseen folder: at most 16 x 16 = 256 tokens."""
    return 4 if img_size <= 48 else 8 if img_size <= 128 else 16


def model_default_cfg(cfg: TrainConfig) -> Dict[str, Any]:
    """The chosen model's ``default_cfg`` (built on the meta device: no memory, no init cost)."""
    from vitlab.models.factory import create_model

    kw = _model_kwargs(cfg, {})
    try:
        with torch.device("meta"):
            return dict(create_model(cfg.model, **kw).default_cfg)
    except Exception:  # a bad name or argument is reported when the real model is built
        return {}


def _model_kwargs(cfg: TrainConfig, extra: Dict[str, Any]) -> Dict[str, Any]:
    kw = dict(cfg.model_kwargs or {})
    kw.update(extra)
    if cfg.drop_path:
        kw["drop_path_rate"] = cfg.drop_path
    if cfg.drop:
        kw["drop_rate"] = cfg.drop
    return kw


def _default_model(cfg: TrainConfig) -> bool:
    d = TrainConfig()
    return cfg.model == d.model and cfg.model_kwargs == d.model_kwargs


def _per_channel(values, in_chans: int) -> List[float]:
    """Mean/std for ``in_chans`` channels: as given, averaged to one, or one repeated."""
    v = [float(x) for x in values]
    if len(v) == in_chans:
        return v
    if len(v) == 1:
        return v * in_chans
    if in_chans == 1:
        return [sum(v) / len(v)]
    raise UserError(f"mean/std {v} have {len(v)} values but the data has {in_chans} channels")


def data_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """The data-dependent settings the config leaves open: image size, channels, mean/std, crop,
    padding, flip and eval crop.  Digits and CIFAR: their natural size.  A folder: the default
    model takes the images' own size (its patch size chosen for at most 256 tokens); a model
    chosen by name takes its ``default_cfg`` size, mean/std and crop_pct."""
    from vitlab.data import dataset_info

    info = dataset_info(cfg.data)
    kind, natural = info["kind"], int(info["img_size"])
    model_kwargs, mcfg = None, {}
    if kind == "folder" and _default_model(cfg) and not cfg.pretrained:
        patch = _auto_patch(cfg.img_size or natural)
        model_kwargs = dict(cfg.model_kwargs, patch_size=patch)
        size = cfg.img_size or max(patch, int(round(natural / patch)) * patch)
    elif kind in ("folder", "clips"):
        mcfg = model_default_cfg(cfg)
        size = cfg.img_size or int(mcfg.get("input_size", (3, natural, natural))[-1])
    else:
        size = cfg.img_size or natural
    packing = None if kind == "clips" else _packing(cfg, size, info["in_chans"])
    small = size <= 64
    use_model_norm = bool(mcfg) and cfg.pretrained is not None
    return dict(
        kind=kind, img_size=size, in_chans=info["in_chans"],
        mean=_per_channel(cfg.mean or (mcfg["mean"] if use_model_norm else info["mean"]), info["in_chans"]),
        std=_per_channel(cfg.std or (mcfg["std"] if use_model_norm else info["std"]), info["in_chans"]),
        crop=cfg.crop or ("none" if packing else "affine" if kind == "digits" else "pad" if small else "rrc"),
        padding=cfg.padding if cfg.padding is not None else (2 if kind == "digits" else max(1, size // 8)),
        hflip=cfg.hflip if cfg.hflip is not None else (0.0 if info["in_chans"] == 1 else 0.5),
        crop_pct=cfg.crop_pct or (1.0 if small or packing else float(mcfg.get("crop_pct", 0.875))),
        model_kwargs=model_kwargs, packing=packing, **(_clip_settings(cfg, mcfg) if kind == "clips" else {}),
    )


def _packing(cfg: TrainConfig, img_size: int, in_chans: int) -> Optional[Dict[str, Any]]:
    """The packing geometry (:func:`vitlab.data.packing.packing_geometry`) of a model with the ``packs``
    capability (NaViT), built on the meta device; None for other models.  A capability, not a name test: any
    model that takes :class:`~vitlab.models.navit.PackedBatch` inputs declares it and is fed the same way."""
    from vitlab.data.packing import packing_geometry
    from vitlab.models.factory import create_model, model_entrypoint

    try:
        cls = getattr(model_entrypoint(cfg.model), "model_cls", None)
        if cls is not None and not getattr(cls, "packs", False):  # most models: no build needed
            return None
        with torch.device("meta"):
            model = create_model(cfg.model, **_model_kwargs(cfg, dict(img_size=img_size, in_chans=in_chans)))
    except Exception:  # a bad name or argument is reported when the real model is built
        return None
    geometry = packing_geometry(model)
    if geometry is not None:
        _check_packed_flags(cfg)
    return geometry


def _check_packed_flags(cfg: TrainConfig) -> None:
    """Packed training feeds native-size images as sequences: refuse what needs one image size or a tensor batch."""
    why = {"--mixup": (cfg.mixup > 0, "mixes whole images of one size"),
           "--cutmix": (cfg.cutmix > 0, "pastes boxes between images of one size"),
           "--channels-last": (cfg.channels_last, "formats a (B, C, H, W) batch"),
           "--distill": (cfg.distill not in (None, "none"), "feeds the batch to a teacher that takes no packed input"),
           "--randaug": (bool(cfg.randaug), "translates by a fixed number of pixels"),
           "--reprob": (cfg.reprob > 0, "is not implemented for packed batches"),
           "--color-jitter": (cfg.color_jitter > 0, "is not implemented for packed batches")}
    for flag, (on, reason) in why.items():
        if on:
            raise UserError(f"{flag} cannot be used with {cfg.model}, which trains on packed native-size images: "
                            f"it {reason}")
    if cfg.crop not in (None, "none", "rrc"):
        raise UserError(f"--crop {cfg.crop}: {cfg.model} trains on native-size images; use --crop none (default) or "
                        "rrc (a random resize of each image, area factor in [--scale-min, 1])")


def _clip_settings(cfg: TrainConfig, mcfg: Dict[str, Any]) -> Dict[str, Any]:
    """Clips feed video models only (``input_size`` ``(C, T, H, W)``): the frames each clip is sampled to."""
    size = tuple(mcfg.get("input_size", ()))
    if len(size) != 4:
        raise UserError(f"--data {cfg.data} holds clips (.npy volumes or frame folders), but model {cfg.model} takes "
                        f"images {size}; choose a video model (vitlab models 'viv*', 'vit3d*')")
    if cfg.cutmix > 0:
        raise UserError("--cutmix cuts images; it is not defined for clips (use --mixup)")
    return dict(num_frames=int(size[1]))


def _check_kwarg_types(name: str, kwargs: Dict[str, Any]) -> None:
    """A model argument whose default is a bool / int / float must get one of that kind."""
    import inspect

    from vitlab.models.factory import model_entrypoint

    try:
        fn = model_entrypoint(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    target = getattr(fn, "model_cls", None)
    if target is None:  # a recipe factory taking **kwargs: its class, built for free on the meta device
        try:
            with torch.device("meta"):
                target = type(fn())
        except Exception:
            target = None
    try:
        params = inspect.signature(target.__init__ if target is not None else fn).parameters
    except (TypeError, ValueError):
        return
    for k, v in kwargs.items():
        default = params[k].default if k in params else None
        for kind in (bool, int, float):
            if type(default) is kind and not (type(v) is kind or (kind is float and type(v) is int)):
                raise UserError(f"--model-kwargs {k}={v!r}: model {name} expects {kind.__name__} "
                                f"(default {default!r})")


def build_model(cfg: TrainConfig, num_classes: int, img_size: int, in_chans: int,
                model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``create_model`` with the config's overrides; a bad model argument is a one-line error."""
    from vitlab.models.factory import create_model

    base = cfg.model_kwargs if model_kwargs is None else model_kwargs
    kw = _model_kwargs(TrainConfig(model=cfg.model, model_kwargs=dict(base or {}), drop_path=cfg.drop_path,
                                   drop=cfg.drop), dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans))
    _check_kwarg_types(cfg.model, base or {})
    try:
        return create_model(cfg.model, **kw)
    except TypeError as exc:
        raise UserError(f"--model-kwargs {cfg.model_kwargs} do not fit model {cfg.model}: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot build model {cfg.model} with {kw}: {str(exc).splitlines()[0]}") from None


@dataclass
class Data:
    train_set: Any
    val_set: Any
    classes: List[str]
    settings: Dict[str, Any]
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int


def build_data(cfg: TrainConfig, world_size: int, rank: int, pin: bool) -> Data:
    from vitlab.data import build_dataset_pair, build_eval_loader, build_eval_transform, build_train_loader, \
        build_train_transform

    ds, collate, eval_collate = data_settings(cfg), None, None
    train_set, val_set, classes = build_dataset_pair(cfg.data, cfg.data_dir, cfg.download, cfg.skip_broken)
    if ds["kind"] == "clips":
        from vitlab.data.clips import build_clip_transform

        train_tf = build_clip_transform(ds["num_frames"], ds["img_size"], ds["mean"], ds["std"], True, ds["hflip"],
                                        cfg.scale_min)
        eval_tf = build_clip_transform(ds["num_frames"], ds["img_size"], ds["mean"], ds["std"], False,
                                       crop_pct=ds["crop_pct"])
    elif ds.get("packing"):  # NaViT: native sizes, packed by the collate (vitlab.data.packing)
        from vitlab.data.packing import packed_transforms

        scale = (cfg.scale_min, 1.0) if ds["crop"] == "rrc" else None
        train_tf, eval_tf, collate, eval_collate = packed_transforms(
            ds["packing"], ds["mean"], ds["std"], ds["in_chans"], ds["hflip"], scale, ds["packing"]["token_drop"])
    else:
        train_tf = build_train_transform(ds["img_size"], ds["in_chans"], ds["mean"], ds["std"], crop=ds["crop"],
                                         scale_min=cfg.scale_min, padding=ds["padding"], hflip=ds["hflip"],
                                         randaug=cfg.randaug, reprob=cfg.reprob, interpolation=cfg.interpolation,
                                         color_jitter=cfg.color_jitter, degrees=cfg.affine_degrees,
                                         scale_jitter=cfg.affine_scale)
        eval_tf = build_eval_transform(ds["img_size"], ds["in_chans"], ds["mean"], ds["std"], ds["crop_pct"],
                                       cfg.interpolation)
    drop_last = cfg.mixup > 0 or cfg.cutmix > 0
    train_loader = build_train_loader(train_set, train_tf, cfg.batch_size, cfg.seed, world_size, rank, cfg.workers,
                                      cfg.repeated_aug, pin, drop_last=drop_last, collate_fn=collate)
    val_loader = build_eval_loader(val_set, eval_tf, cfg.batch_size * 2, world_size, rank, cfg.workers, pin,
                                   collate_fn=eval_collate)
    steps = len(train_loader) // cfg.accum_steps  # optimizer updates per epoch
    if steps < 1:
        raise UserError(f"batch-size {cfg.batch_size} x accum-steps {cfg.accum_steps} exceeds the "
                        f"{len(train_loader.sampler)} training images per rank")
    return Data(train_set, val_set, list(classes), ds, train_loader, val_loader, steps)


@dataclass
class Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: Any
    mixup: Any
    criterion: nn.Module
    lr: float
    global_batch: int
    num_classes: int
    pretrained_report: Optional[str] = None
    distill: Any = None  # vitlab.engine.distill.Distiller with --distill


def build_parts(cfg: TrainConfig, data: Data, device: torch.device, world_size: int) -> Parts:
    """Model (seeded; ``--pretrained`` weights adapted), optimiser, schedule, scaler, EMA, loss."""
    import numpy as np

    from vitlab.engine.optim import build_optimizer, build_scheduler

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    ds, num_classes = data.settings, cfg.num_classes or len(data.classes)
    model = build_model(cfg, num_classes, ds["img_size"], ds["in_chans"], ds.get("model_kwargs"))
    report = None
    if cfg.pretrained:
        from vitlab.interop.checkpoint import load_pretrained

        report = load_pretrained(model, cfg.pretrained).summary()
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 512
    optimizer = build_optimizer(model, cfg.opt, lr, cfg.weight_decay, cfg.momentum, cfg.betas, cfg.layer_decay,
                                cfg.weight_decay_1d, cfg.eps)
    scheduler = build_scheduler(optimizer, cfg, data.steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    mixup, criterion = None, nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    from vitlab.engine.distill import build_distiller

    distill = build_distiller(cfg, model, num_classes, ds, device, criterion)
    return Parts(model, optimizer, scheduler, scaler, ema, mixup, criterion, lr, global_batch, num_classes, report,
                 distill)
