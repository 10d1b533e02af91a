"""Training and evaluation engine: config, loop, checkpoints, EMA, DDP, metrics."""
from vitlab.engine.config import TrainConfig, load_recipe, resolve_config
from vitlab.engine.trainer import TrainingDiverged, evaluate, predict, train

__all__ = ["TrainConfig", "load_recipe", "resolve_config", "train", "evaluate", "predict", "TrainingDiverged"]
