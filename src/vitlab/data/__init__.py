"""Data: the bundled digits, ImageFolder streaming, CIFAR; transforms; resumable loaders."""
from vitlab.data.datasets import (BrokenImageError, BundledDigits, StreamingImageFolder, build_dataset_pair,
                                  build_eval_dataset, dataset_info)
from vitlab.data.loader import EpochSampler, SeededTransform, build_eval_loader, build_train_loader
from vitlab.data.transforms import build_eval_transform, build_train_transform

__all__ = ["BrokenImageError", "BundledDigits", "StreamingImageFolder", "build_dataset_pair", "build_eval_dataset", "dataset_info",
           "EpochSampler", "SeededTransform", "build_train_loader", "build_eval_loader", "build_train_transform",
           "build_eval_transform"]
