"""vitlab backbones; importing this package registers every model family."""
from vitlab.models.base import Intermediate, VitlabModel
from vitlab.models.vit import Block, VisionTransformer

__all__ = ["Intermediate", "VitlabModel", "Block", "VisionTransformer"]
