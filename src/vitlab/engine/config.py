"""Training configuration: defaults (the offline main job), recipe files, command-line overrides.

Precedence: built-in defaults < recipe file (``--recipe NAME|PATH``) < command-line flags.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["TrainConfig", "load_recipe", "recipe_dir", "list_recipes", "resolve_config", "folder_epochs"]


@dataclass
class TrainConfig:
    # model
    model: str = "vit_tiny_patch4_28"
    model_kwargs: Dict[str, Any] = field(default_factory=lambda: dict(
        embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, patch_size=4, embed="conv", global_pool="avg",
        class_token=False, mlp="localvit"))
    num_classes: Optional[int] = None  # None: from the data set
    img_size: Optional[int] = None  # None: the data set's natural size (28 digits, 32 CIFAR, 224 folders)
    drop_path: float = 0.0
    drop: float = 0.0  # dropout in MLP / projections (model drop_rate)
    pretrained: Optional[str] = None  # weights to fine-tune from (vitlab/timm file or model directory)
    # data
    data: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    workers: int = 1
    skip_broken: bool = False
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    crop: Optional[str] = None  # rrc | pad | affine | none (None: affine for digits, pad up to 64 px, rrc above)
    affine_degrees: float = 10.0  # crop=affine: rotation range (+-degrees)
    affine_scale: float = 0.1  # crop=affine: zoom range 1 +- this
    scale_min: float = 0.08
    padding: Optional[int] = None
    hflip: Optional[float] = None  # None: 0.5, but 0 for digits
    randaug: Optional[str] = None  # timm string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0
    color_jitter: float = 0.0  # used only without RandAugment (as in timm)
    repeated_aug: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    crop_pct: Optional[float] = None
    interpolation: str = "bicubic"
    # optimisation
    epochs: int = 20
    batch_size: int = 32
    accum_steps: int = 1
    opt: str = "adamw"  # any name of timm's optimizer factory
    sched: str = "cosine"  # cosine | tanh | step | multistep | poly | constant | wsd | plateau (timm's factory)
    decay_epochs: Optional[float] = None  # step: decay interval; wsd: decay length (timm's default if None)
    decay_milestones: List[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])  # multistep
    decay_rate: float = 0.1  # step / multistep / plateau factor; poly power
    patience_epochs: int = 10  # plateau
    lr: Optional[float] = 2e-3
    blr: Optional[float] = None  # base lr per 512 images: lr = blr * global_batch / 512 (DeiT)
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    cooldown_epochs: int = 0  # extra epochs at min_lr after the cosine
    weight_decay: float = 0.05
    weight_decay_1d: float = 0.0  # decay of the no_weight_decay() group (LipsFormer uses 5e-4)
    eps: float = 1e-8
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: Optional[float] = None
    layer_decay: Optional[float] = None
    ema: bool = False
    ema_decay: float = 0.9998
    # distillation (DeiT): vitlab.engine.distill
    distill: Optional[str] = None  # None / none | hard | soft
    teacher: Optional[str] = None  # checkpoint, run directory or model directory of the teacher
    teacher_model: Optional[str] = None  # the teacher's model name (bare weights only)
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    # systems
    amp: str = "auto"  # auto (bf16 on a CPU with native bf16, else none) | none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    threads: Optional[int] = None
    # output
    out: Optional[str] = None
    resume: Optional[str] = None
    ckpt_every_steps: int = 0
    keep_epoch_ckpts: bool = False
    eval_every: int = 1
    eval_metric: str = "top1"  # best checkpoint by top1 | top5 (higher) or nll | ece (lower)
    checkpoint_hist: int = 1  # keep the N best checkpoints (best.pt + best-epochK.pt)
    log_interval: int = 50  # steps between steps.jsonl records and plain progress lines (0: off)
    tensorboard: bool = False
    progress: bool = True
    max_steps: Optional[int] = None  # stop after this many optimizer steps (debugging / tests)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "TrainConfig":
        cfg = cls()
        cfg.update(d, source)
        return cfg

    def update(self, d: Dict[str, Any], source: str = "config") -> None:
        names = {f.name for f in dataclasses.fields(self)}
        keys = {k.replace("-", "_") for k in d}
        if "model" in keys and "model_kwargs" not in keys and d.get("model") != self.model:
            self.model_kwargs = {}  # overrides of the previous model do not carry over to a new one
        for k, v in d.items():
            key = k.replace("-", "_")
            if key not in names:
                import difflib

                close = difflib.get_close_matches(key, names, n=3)
                raise ValueError(f"unknown setting {k!r} in {source}" + (f"; did you mean {', '.join(close)}?"
                                                                          if close else ""))
            setattr(self, key, v)

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if v is None or v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        positive("epochs")
        positive("batch_size")
        positive("accum_steps")
        positive("warmup_epochs", allow_zero=True)
        positive("weight_decay", allow_zero=True)
        positive("workers", allow_zero=True)
        positive("smoothing", allow_zero=True)
        positive("mixup", allow_zero=True)
        positive("cutmix", allow_zero=True)
        positive("ckpt_every_steps", allow_zero=True)
        positive("cooldown_epochs", allow_zero=True)
        positive("weight_decay_1d", allow_zero=True)
        if self.lr is None and self.blr is None:
            raise ValueError("set a learning rate: --lr or --blr")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.smoothing >= 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing!r}")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, none, bf16 or fp16, got {self.amp!r}")
        from vitlab.engine.optim import SCHEDULES, optimizer_names

        if self.opt not in optimizer_names():
            import difflib

            close = difflib.get_close_matches(self.opt, optimizer_names(), n=3)
            raise ValueError(f"opt {self.opt!r} is not one of timm's optimizers" +
                             (f"; did you mean {', '.join(close)}?" if close else " (see timm.optim.list_optimizers())"))
        if self.sched not in SCHEDULES:
            raise ValueError(f"sched must be one of {', '.join(SCHEDULES)}, got {self.sched!r}")
        if self.eval_metric not in ("top1", "top5", "nll", "ece"):
            raise ValueError(f"eval-metric must be top1, top5, nll or ece, got {self.eval_metric!r}")
        positive("checkpoint_hist")
        positive("log_interval", allow_zero=True)
        positive("eval_every", allow_zero=True)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be >= 1, got {self.max_steps!r}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip-grad must be > 0 (leave it out to switch clipping off), got {self.clip_grad!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model-kwargs must be a mapping such as depth=6,embed_dim=192, got {self.model_kwargs!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.pretrained is not None and not os.path.exists(self.pretrained):
            raise ValueError(f"--pretrained {self.pretrained}: no such file or model directory")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer-decay must be in (0, 1], got {self.layer_decay!r}")
        self._validate_distill()
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup-epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")


    def _validate_distill(self) -> None:
        from vitlab.errors import UserError

        if self.distill in (None, "none"):
            return
        if self.distill not in ("hard", "soft"):
            raise UserError(f"--distill {self.distill!r}: expected hard, soft or none")
        if not self.teacher:
            raise UserError(f"--distill {self.distill} needs --teacher CHECKPOINT_OR_RUN_DIR")
        if not os.path.exists(self.teacher):
            raise UserError(f"--teacher {self.teacher}: no such checkpoint file or run directory")
        if not 0 <= self.distill_alpha <= 1:
            raise UserError(f"--distill-alpha {self.distill_alpha!r}: expected a weight in [0, 1]")
        if not self.distill_tau > 0:
            raise UserError(f"--distill-tau {self.distill_tau!r}: expected a temperature > 0")


def recipe_dir() -> str:
    """The ``recipes/`` folder of the source tree (or $VITLAB_RECIPES)."""
    env = os.environ.get("VITLAB_RECIPES")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "recipes"))


def list_recipes() -> List[str]:
    d = recipe_dir()
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml")) if os.path.isdir(d) else []


def load_recipe(name_or_path: str) -> Dict[str, Any]:
    """Read a recipe: a path to a ``.yaml``/``.json`` file or a name in ``recipes/``."""
    import yaml

    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(recipe_dir(), name_or_path + ("" if name_or_path.endswith(".yaml") else ".yaml"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe {name_or_path!r} not found (not a file, not in {recipe_dir()}); "
                                f"available: {', '.join(list_recipes()) or 'none'}")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"recipe {path} must hold a mapping of settings, got {type(d).__name__}")
    d.pop("reference", None)  # free-form provenance notes
    return d


# An ImageFolder run of the default length takes at least as many optimizer steps as the main job
# (4,000 digits x 20 epochs at batch 32), so a small folder gets more epochs, capped at FOLDER_MAX_EPOCHS.
FOLDER_MIN_STEPS = 2500
FOLDER_MAX_EPOCHS = 100


def folder_epochs(num_images: int, batch_size: int, accum_steps: int = 1, base: int = 20) -> int:
    """Default epochs for an ImageFolder of ``num_images`` training images: ``base``, or more (up to
    ``FOLDER_MAX_EPOCHS``) so the run makes at least ``FOLDER_MIN_STEPS`` optimizer steps."""
    steps_per_epoch = max(1, -(-num_images // (batch_size * accum_steps)))
    return max(base, min(FOLDER_MAX_EPOCHS, -(-FOLDER_MIN_STEPS // steps_per_epoch)))


def resolve_config(recipe: Optional[str], overrides: Dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    given = set()
    if recipe:
        settings = load_recipe(recipe)
        cfg.update(settings, source=f"recipe {recipe}")
        given |= {k.replace("-", "_") for k in settings}
    flags = {k: v for k, v in overrides.items() if v is not None}
    cfg.update(flags, source="command line")
    given |= {k.replace("-", "_") for k in flags}
    cfg.validate()
    if "epochs" not in given and os.path.isdir(cfg.data):  # the epochs follow the folder's size
        from vitlab.data import dataset_info

        n = dataset_info(cfg.data).get("num_images")
        if n:
            cfg.epochs = folder_epochs(int(n), cfg.batch_size, cfg.accum_steps, cfg.epochs)
    return cfg
