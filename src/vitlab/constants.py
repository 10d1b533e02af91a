"""Per-data-set normalisation constants: the one home of every mean and std in vitlab.

Models (their ``pretrained_cfg``), data pipelines and the analysis all read them from here, so a
CIFAR-trained model sees the same input scaling in ``train``, ``eval`` and ``analyze``.
"""
from __future__ import annotations

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
           "MNIST_MEAN", "MNIST_STD"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the per-channel std of the 50,000 training images (not the often-copied 0.2023, 0.1994, 0.2010,
# which is the mean of per-image stds)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
