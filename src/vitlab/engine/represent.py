"""``vitlab eval --knn`` / ``--linear-probe``: evaluate the frozen representation of a checkpoint.

Works on a ``vitlab pretrain`` checkpoint (an encoder without classifier) and on a ``vitlab train``
checkpoint (its classifier is ignored).  Features are the backbone's pooled pre-logits
(``forward_head(forward_features(x), pre_logits=True)``) of the training and validation splits, each
image through the evaluation transform (no augmentation).

* k-NN: :func:`knn_predict` (DINO's weighted vote, see :mod:`vitlab.pretrain.knn`: k = 20, T = 0.07, cosine similarity on
  L2-normalised features);
* linear probe (MAE's protocol, "Masked Autoencoders Are Scalable Vision Learners", He et al.,
  appendix A.3: a BatchNorm without affine parameters before a linear classifier on frozen
  features): the features are standardised with the training split's mean and (biased) variance,
  as an affine-free BatchNorm does at evaluation, then a multinomial logistic regression
  (scikit-learn's ``LogisticRegression``, L-BFGS, L2 penalty ``C``) is fitted on the training split
  and scored on the validation split.  The full-batch convex fit replaces the reference's LARS SGD:
  it has one optimum, so the number does not depend on a schedule.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.engine.distributed import resolve_device
from vitlab.errors import UserError

__all__ = ["extract_features", "knn_predict", "load_encoder", "linear_probe", "evaluate_representation"]


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device,
                     normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (L2-normalised unless ``normalize=False``) and labels of a whole loader (the
    model in eval mode)."""
    was = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
            f = f.float()
            feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
            labels.append(y)
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int = 20,
                t: float = 0.07, num_classes: int = 0, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of every test feature (features already L2-normalised)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    out = []
    for start in range(0, len(test_feats), chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[idx], (top.double() / t).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out)


def load_encoder(checkpoint: str, ema: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """The checkpoint's backbone (eval mode) and its data facts: ``data``, ``data_dir``,
    ``img_size``, ``in_chans``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``kind``."""
    from vitlab.engine.build import build_model
    from vitlab.engine.checkpoint import load_checkpoint
    from vitlab.engine.config import TrainConfig
    from vitlab.engine.inference import load_train_checkpoint

    ckpt = load_checkpoint(checkpoint)
    img, chans = int(ckpt["img_size"]), int(ckpt["in_chans"])
    if ckpt.get("vitlab_pretrain"):
        pcfg = ckpt.get("pretrain_config") or {}
        cfg = TrainConfig(model=ckpt["model_name"], model_kwargs=dict(ckpt.get("model_kwargs") or {}))
        model, name, kind = build_model(cfg, 0, img, chans, cfg.model_kwargs), cfg.model, f"pretrain ({ckpt['method']})"
        facts = dict(data=pcfg.get("data", "digits"), data_dir=pcfg.get("data_dir"), interpolation="bicubic")
        if ema:
            raise UserError(f"--ema: {checkpoint} is a pretraining checkpoint, it holds no EMA weights")
        model.load_state_dict(ckpt["model"])
    elif "config" in ckpt:
        im = load_train_checkpoint(checkpoint, ema, ckpt)  # the model with the (EMA) weights
        model, name, kind = im.model, im.name, "train"
        facts = dict(data=im.data, data_dir=im.data_dir, interpolation=im.interpolation)
    else:
        raise UserError(f"--checkpoint {checkpoint}: not a vitlab train or vitlab pretrain checkpoint")
    if not hasattr(model, "forward_head"):
        raise UserError(f"--checkpoint {checkpoint}: model {name} has no forward_head (pooled features)")
    d = ckpt.get("data") or {}
    facts.update(img_size=img, in_chans=chans, mean=list(d["mean"]), std=list(d["std"]), kind=kind,
                 crop_pct=float(d.get("crop_pct") or (1.0 if img <= 64 else 0.875)))
    return model.eval(), facts


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, c: float = 1.0,
                 max_iter: int = 1000) -> torch.Tensor:
    """Predicted classes of ``val_f``: affine-free BatchNorm statistics of ``train_f``, then a
    multinomial logistic regression fitted on the training features."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = train_f.double().numpy()
    mean, std = x.mean(0), (x.var(0) + 1e-6) ** 0.5  # BatchNorm1d(affine=False): biased variance, eps 1e-6
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - mean) / std, train_y.numpy())
    return torch.from_numpy(clf.predict((val_f.double().numpy() - mean) / std))


def _features(model: nn.Module, facts: Dict[str, Any], data: str, data_dir, batch_size: int, workers: int,
              device: torch.device):
    from vitlab.data import build_dataset_pair, build_eval_loader, build_eval_transform
    train_set, val_set, classes = build_dataset_pair(data, data_dir, False, False)
    tf = build_eval_transform(facts["img_size"], facts["in_chans"], facts["mean"], facts["std"], facts["crop_pct"],
                              facts["interpolation"])
    loaders = [build_eval_loader(s, tf, batch_size, workers=workers) for s in (train_set, val_set)]
    return [extract_features(model, ld, device, normalize=False) for ld in loaders] + [len(classes)]


def evaluate_representation(checkpoint: str, knn: bool = True, probe: bool = False, data=None, data_dir=None,
                            ema: bool = False, k: int = 20, t: float = 0.07, c: float = 1.0, batch_size: int = 256,
                            workers: int = 0, device: str = "auto") -> Dict[str, Any]:
    """``knn_top1`` and / or ``linear_probe_top1`` (percent) of the checkpoint's frozen features."""
    if k < 1:
        raise UserError(f"--knn-k {k!r}: expected an integer >= 1")
    if t <= 0:
        raise UserError(f"--knn-t {t!r}: expected a temperature > 0")
    if c <= 0:
        raise UserError(f"--probe-c {c!r}: expected an inverse regularisation strength > 0")
    dev = resolve_device(device)
    model, facts = load_encoder(checkpoint, ema)
    model.to(dev)
    data, data_dir = data or facts["data"], data_dir or facts["data_dir"]
    out: Dict[str, Any] = dict(checkpoint=os.path.abspath(checkpoint), checkpoint_kind=facts["kind"], data=data,
                               ema=bool(ema))
    (tr_f, tr_y), (va_f, va_y), n = _features(model, facts, data, data_dir, batch_size, workers, dev)
    if knn:
        pred = knn_predict(F.normalize(tr_f, dim=1), tr_y, F.normalize(va_f, dim=1), k, t, num_classes=n)
        out.update(knn_top1=float(100.0 * (pred == va_y).double().mean()), knn_k=k, knn_t=t)
    if probe:
        pred = linear_probe(tr_f, tr_y, va_f, c)
        out.update(linear_probe_top1=float(100.0 * (pred == va_y).double().mean()), probe_c=c)
    out.update(train_images=len(tr_y), images=len(va_y), feature_dim=int(tr_f.shape[1]))
    return out
