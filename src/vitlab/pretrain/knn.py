"""Weighted k-NN classification on frozen features (DINO's ``eval_knn.py``; Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018).

Features are the backbone's pooled pre-logits (``forward_head(forward_features(x), pre_logits=True)``),
L2-normalised; a test image's ``k`` nearest training images by cosine similarity ``s`` vote for their
class with weight ``exp(s / T)`` (k = 20, T = 0.07); the class with the largest total wins.  This is
scikit-learn's ``KNeighborsClassifier(k, metric="cosine", weights=lambda d: exp(-d / T))``: the
cosine distance is ``d = 1 - s``, so the weights differ by the constant factor ``exp(1 / T)``.

The feature extraction and the vote live in :mod:`vitlab.engine.represent` (``vitlab eval --knn``
uses them too) and are re-exported here.
"""
from __future__ import annotations

import torch
from torch import nn

from vitlab.engine.represent import extract_features, knn_predict

__all__ = ["extract_features", "knn_predict", "knn_accuracy"]


def knn_accuracy(model: nn.Module, train_loader, val_loader, device: torch.device, k: int = 20,
                 t: float = 0.07) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN classifier on ``model``'s frozen features."""
    train_f, train_y = extract_features(model, train_loader, device)
    val_f, val_y = extract_features(model, val_loader, device)
    pred = knn_predict(train_f, train_y, val_f, k, t, num_classes=int(max(train_y.max(), val_y.max())) + 1)
    return float(100.0 * (pred == val_y).double().mean())
