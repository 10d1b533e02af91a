"""timm <-> vitlab keys for ResNet (``timm.models.resnet.ResNet``).

vitlab's :class:`~vitlab.models.resnet.ResNet` uses timm's key names (``conv1``, ``bn1``,
``layer{1..4}.{i}.conv{1,2,3}``/``bn{1,2,3}``/``downsample.{0,1}``, ``fc``), BatchNorm buffers
included, so the conversion is the identity.
"""
from __future__ import annotations

from vitlab.interop.timm import register_identity_converter
from vitlab.models.resnet import ResNet

register_identity_converter(ResNet)
