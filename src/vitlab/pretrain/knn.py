"""Weighted k-NN classification on frozen features (DINO's ``eval_knn.py``; Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018).

Features are the backbone's pooled pre-logits (``forward_head(forward_features(x), pre_logits=True)``),
L2-normalised; a test image's ``k`` nearest training images by cosine similarity ``s`` vote for their
class with weight ``exp(s / T)`` (k = 20, T = 0.07); the class with the largest total wins.  This is
scikit-learn's ``KNeighborsClassifier(k, metric="cosine", weights=lambda d: exp(-d / T))``: the
cosine distance is ``d = 1 - s``, so the weights differ by the constant factor ``exp(1 / T)``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["extract_features", "knn_predict", "knn_accuracy"]


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features and labels of a whole loader (the model in eval mode)."""
    was = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
            feats.append(F.normalize(f.float(), dim=1).cpu())
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


def knn_accuracy(model: nn.Module, train_loader, val_loader, device: torch.device, k: int = 20,
                 t: float = 0.07) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN classifier on ``model``'s frozen features."""
    train_f, train_y = extract_features(model, train_loader, device)
    val_f, val_y = extract_features(model, val_loader, device)
    pred = knn_predict(train_f, train_y, val_f, k, t, num_classes=int(max(train_y.max(), val_y.max())) + 1)
    return float(100.0 * (pred == val_y).double().mean())
