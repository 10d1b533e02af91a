"""Settings of a pretraining run (``vitlab pretrain``): one dataclass, per-method defaults.

A setting left at ``None`` takes its method's default (:data:`METHOD_DEFAULTS`): the papers'
recipes scaled to the bundled digits and a budget of minutes on a CPU (see docs/pretraining.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from vitlab.errors import UserError

__all__ = ["PretrainConfig", "METHODS", "METHOD_DEFAULTS", "DEFAULT_MODEL_KWARGS"]

METHODS = ("mae", "simmim", "dino", "mpp", "mp3")
EVALS = ("knn", "none")

# vitlab train's default digits ViT, with a patchify stem (MAE refuses the overlapping conv stem)
DEFAULT_MODEL_KWARGS: Dict[str, Any] = dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, patch_size=4,
                                            embed="patch", global_pool="avg", class_token=False)

# per method: the reference recipe's shape (AdamW, cosine with warmup) at a CPU-sized budget
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mae": dict(epochs=30, lr=1.5e-3, weight_decay=0.05, betas=[0.9, 0.95], warmup_epochs=2.0, mask_ratio=0.75,
                clip_grad=None, drop_path=0.0),
    "simmim": dict(epochs=30, lr=1e-3, weight_decay=0.05, betas=[0.9, 0.999], warmup_epochs=2.0, mask_ratio=0.6,
                   clip_grad=5.0, drop_path=0.0),
    "dino": dict(epochs=20, lr=5e-4, weight_decay=0.04, betas=[0.9, 0.999], warmup_epochs=2.0, mask_ratio=None,
                 clip_grad=3.0, drop_path=0.1),
    # ViT paper, B.1.2: Adam (here AdamW), 50% corrupted patches, global-norm clipping at 1
    "mpp": dict(epochs=30, lr=1e-3, weight_decay=0.05, betas=[0.9, 0.999], warmup_epochs=2.0, mask_ratio=0.5,
                clip_grad=1.0, drop_path=0.0),
    # MP3 (Zhai et al., ICML 2022): 75% of the patches hidden from the keys (vit-pytorch's README value); the
    # optimiser as MPP's here (the paper's ImageNet recipe is not used at this budget)
    "mp3": dict(epochs=30, lr=1e-3, weight_decay=0.05, betas=[0.9, 0.999], warmup_epochs=2.0, mask_ratio=0.75,
                clip_grad=1.0, drop_path=0.0),
}


@dataclass
class PretrainConfig:
    method: str = "mae"
    model: str = "vit_tiny_patch4_28"
    model_kwargs: Optional[Dict[str, Any]] = None  # None: DEFAULT_MODEL_KWARGS for the default model, else {}
    img_size: Optional[int] = None
    data: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    workers: int = 1
    batch_size: int = 64
    epochs: Optional[int] = None
    lr: Optional[float] = None
    min_lr: float = 1e-6
    warmup_epochs: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[List[float]] = None
    clip_grad: Optional[float] = None  # MAE/SimMIM: global norm; DINO: per parameter (0: off)
    drop_path: Optional[float] = None
    # MAE / SimMIM
    mask_ratio: Optional[float] = None
    norm_pix_loss: bool = False
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_head_dim: Optional[int] = None  # None: decoder_dim / decoder_heads
    mask_patch: Optional[int] = None
    # MPP
    mpp_bits: int = 3
    # DINO
    local_crops: int = 6
    local_size: Optional[int] = None
    global_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: Optional[int] = None  # None: a tenth of the epochs (the README's 30 of 300)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    freeze_last_layer: int = 1
    # evaluation, systems, output
    eval: str = "knn"
    knn_k: int = 20
    knn_t: float = 0.07
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    out: Optional[str] = None
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    ckpt_every_steps: int = 0
    log_interval: int = 50
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PretrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown pretraining setting(s) {', '.join(unknown)}")
        return cls(**d)

    def resolved(self) -> "PretrainConfig":
        """A copy with every ``None`` method setting filled in, validated."""
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        d = self.to_dict()
        for k, v in METHOD_DEFAULTS[self.method].items():
            if d[k] is None:
                d[k] = v
        if self.warmup_epochs is None:  # a short run warms up for a tenth of its epochs at most
            d["warmup_epochs"] = min(d["warmup_epochs"], d["epochs"] / 10)
        if d["model_kwargs"] is None:
            d["model_kwargs"] = dict(DEFAULT_MODEL_KWARGS) if self.model == PretrainConfig.model else {}
        if d["warmup_teacher_temp_epochs"] is None:
            d["warmup_teacher_temp_epochs"] = max(1, d["epochs"] // 10)
        cfg = PretrainConfig(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def check(ok: bool, flag: str, value: Any, expected: str) -> None:
            if not ok:
                raise UserError(f"--{flag} {value!r}: expected {expected}")

        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, "batch-size", self.batch_size, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a learning rate > 0")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup-epochs", self.warmup_epochs,
              f"a number of epochs in [0, {self.epochs}]")
        check(self.weight_decay >= 0, "weight-decay", self.weight_decay, "a value >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        check(self.workers >= 0, "workers", self.workers, "a count >= 0")
        check(0 <= self.drop_path < 1, "drop-path", self.drop_path, "a rate in [0, 1)")
        check(self.clip_grad is None or self.clip_grad >= 0, "clip-grad", self.clip_grad, "a norm >= 0 (0: off)")
        check(self.decoder_head_dim is None or self.decoder_head_dim >= 1, "decoder-head-dim", self.decoder_head_dim,
              "a positive width per head")
        if self.method != "dino":
            check(0 < self.mask_ratio < 1, "mask-ratio", self.mask_ratio, "a fraction strictly between 0 and 1")
        check(self.eval in EVALS, "eval", self.eval, f"one of {', '.join(EVALS)}")
        check(self.knn_k >= 1, "knn-k", self.knn_k, "an integer >= 1")
        check(self.knn_t > 0, "knn-t", self.knn_t, "a temperature > 0")
        check(self.max_steps is None or self.max_steps >= 1, "max-steps", self.max_steps, "an integer >= 1")
        check(self.out_dim >= 1 and self.hidden_dim >= 1 and self.bottleneck_dim >= 1, "out-dim", self.out_dim,
              "positive head sizes (--out-dim, --hidden-dim, --bottleneck-dim)")
        for flag in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
            check(getattr(self, flag) > 0, flag.replace("_", "-"), getattr(self, flag), "a temperature > 0")
        check(0 <= self.momentum_teacher <= 1, "momentum-teacher", self.momentum_teacher, "a momentum in [0, 1]")
        check(0 <= self.center_momentum < 1, "center-momentum", self.center_momentum, "a momentum in [0, 1)")
        check(isinstance(self.model_kwargs, dict), "model-kwargs", self.model_kwargs, "key=value pairs")
