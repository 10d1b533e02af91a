"""vitlab backbones; importing this package registers every model family."""
import importlib
import importlib.util

from vitlab.models.base import Intermediate, VitlabModel
from vitlab.models.vit import Block, VisionTransformer

# one module per family; each registers its recipes (and timm converters) on import
_FAMILIES = ("vit", "deit", "cait", "swin", "cswin", "pvt", "pvt_v2", "resnet", "alternet")
for _name in _FAMILIES:
    if importlib.util.find_spec(f"vitlab.models.{_name}") is not None:
        importlib.import_module(f"vitlab.models.{_name}")

__all__ = ["Intermediate", "VitlabModel", "Block", "VisionTransformer"]
