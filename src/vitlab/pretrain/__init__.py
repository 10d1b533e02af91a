"""Self-supervised pretraining on the model contract (``vitlab pretrain``): MAE (He et al., 2022),
SimMIM (Xie et al., 2022), DINO (Caron et al., 2021) and MPP (Dosovitskiy et al., 2021), with k-NN
evaluation of the frozen encoder.

Each method wraps a :class:`~vitlab.models.backbone.Backbone` through its public surface only
(``forward_stem``, ``forward_tokens``, ``forward_features``, ``forward_head``, ``feature_info``) and
trains with the engine of ``vitlab train`` (resumable loaders, atomic checkpoints, exact resume, DDP).
The checkpoint's ``model`` entry is the encoder, which ``vitlab train --pretrained`` fine-tunes.
"""
from vitlab.pretrain.config import METHODS, PretrainConfig

__all__ = ["METHODS", "PretrainConfig", "pretrain"]


def pretrain(cfg, log=print):
    """Run (or resume) a pretraining run; see :func:`vitlab.pretrain.runner.pretrain`."""
    from vitlab.pretrain.runner import pretrain as _pretrain

    return _pretrain(cfg, log)
