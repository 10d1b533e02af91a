"""Build a method (MAE, SimMIM, DINO, MPP, MP3) around encoders built by ``vitlab.engine.build.build_model``,
and the data transform it trains on."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from vitlab.errors import UserError
from vitlab.pretrain.config import PretrainConfig

__all__ = ["build_encoder", "build_method", "build_transform", "encoder_kwargs"]


def encoder_kwargs(cfg: PretrainConfig, dynamic: bool = False) -> Dict[str, Any]:
    kw = dict(cfg.model_kwargs or {})
    if dynamic:
        kw["dynamic_img_size"] = True
    return kw


def build_encoder(cfg: PretrainConfig, settings: Dict[str, Any], drop_path: float = 0.0,
                  dynamic: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """The backbone without a classifier (``num_classes=0``) and the model arguments used."""
    from vitlab.engine.build import build_model
    from vitlab.engine.config import TrainConfig

    kw = encoder_kwargs(cfg, dynamic)
    tcfg = TrainConfig(model=cfg.model, model_kwargs=kw, drop_path=drop_path)
    try:
        model = build_model(tcfg, 0, settings["img_size"], settings["in_chans"], kw)
    except UserError:
        if not dynamic:
            raise
        return build_encoder(cfg, settings, drop_path, dynamic=False)  # a model without dynamic_img_size
    return model, kw


def build_transform(cfg: PretrainConfig, settings: Dict[str, Any], local_size: int = 0):
    """MAE / SimMIM: vitlab's training transform (random resized crop from 20% of the area, as
    MAE, or the data's own crop: affine for digits); DINO: :class:`MultiCrop`."""
    from vitlab.data import build_train_transform

    s = settings
    if cfg.method == "dino":
        from vitlab.pretrain.crops import MultiCrop

        return MultiCrop(s["img_size"], s["in_chans"], s["mean"], s["std"], cfg.local_crops, local_size,
                         tuple(cfg.global_scale), tuple(cfg.local_scale), s["hflip"])
    return build_train_transform(s["img_size"], s["in_chans"], s["mean"], s["std"], crop=s["crop"], scale_min=0.2,
                                 padding=s["padding"], hflip=s["hflip"])


def _stem_stride(encoder: nn.Module, settings: Dict[str, Any]) -> int:
    size = settings["img_size"]
    if not hasattr(encoder, "forward_stem"):
        raise UserError(f"pretraining needs a transformer backbone (forward_stem / forward_tokens); "
                        f"{type(encoder).__name__} is not one")
    with torch.no_grad():
        was = encoder.training
        _, layout = encoder.eval().forward_stem(torch.zeros(1, settings["in_chans"], size, size))
        encoder.train(was)
    return size // layout.grid[0]


def _check_local_crops(encoder: nn.Module, cfg: PretrainConfig, local: int, in_chans: int) -> None:
    if not cfg.local_crops:
        return
    try:
        with torch.no_grad():
            was = encoder.training
            encoder.eval().forward_features(torch.zeros(1, in_chans, local, local))
            encoder.train(was)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"DINO: model {cfg.model} cannot take the {local} px local crops ({first}); use a model with "
                        f"dynamic_img_size (ViT, DeiT, CaiT), another --local-size, or --local-crops 0") from None


def build_method(cfg: PretrainConfig, settings: Dict[str, Any], steps_per_epoch: int) -> Tuple[nn.Module, Dict]:
    """The method module and the encoder's model arguments (what fine-tuning must rebuild)."""
    img, chans = settings["img_size"], settings["in_chans"]
    if cfg.method == "mae":
        from vitlab.pretrain.mae import MAE

        enc, kw = build_encoder(cfg, settings, cfg.drop_path)
        return MAE(enc, cfg.model, img, chans, cfg.mask_ratio, cfg.norm_pix_loss, cfg.decoder_dim, cfg.decoder_depth,
                   cfg.decoder_heads, cfg.decoder_head_dim), kw
    if cfg.method == "simmim":
        from vitlab.pretrain.simmim import SimMIM

        enc, kw = build_encoder(cfg, settings, cfg.drop_path)
        return SimMIM(enc, cfg.model, img, chans, cfg.mask_ratio, cfg.mask_patch), kw
    if cfg.method == "mpp":
        from vitlab.pretrain.mpp import MPP

        enc, kw = build_encoder(cfg, settings, cfg.drop_path)
        return MPP(enc, cfg.model, img, chans, settings["mean"], settings["std"], cfg.mask_ratio, cfg.mpp_bits), kw
    if cfg.method == "mp3":
        from vitlab.pretrain.mp3 import MP3

        enc, kw = build_encoder(cfg, settings, cfg.drop_path)
        return MP3(enc, cfg.model, img, chans, cfg.mask_ratio), kw
    from vitlab.pretrain.crops import default_local_size
    from vitlab.pretrain.dino import DINO

    student, kw = build_encoder(cfg, settings, cfg.drop_path, dynamic=True)
    teacher, _ = build_encoder(cfg, settings, 0.0, dynamic="dynamic_img_size" in kw)
    local = cfg.local_size or default_local_size(img, _stem_stride(student, settings))
    _check_local_crops(student, cfg, local, chans)
    method = DINO(student, teacher, student.num_features, 2 + cfg.local_crops, cfg.epochs, steps_per_epoch,
                  cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, True, cfg.teacher_temp, cfg.warmup_teacher_temp,
                  cfg.warmup_teacher_temp_epochs, cfg.student_temp, cfg.center_momentum, cfg.momentum_teacher,
                  cfg.clip_grad or 0.0, cfg.freeze_last_layer)
    method.local_size = local
    return method, kw
