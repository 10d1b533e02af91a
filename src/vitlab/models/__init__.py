"""vitlab backbones.  The families register their recipes when :func:`vitlab.models.factory.load_families`
imports them (on the first ``create_model`` / ``list_models``), so ``import vitlab`` stays light."""
import importlib

__all__ = ["Intermediate", "VitlabModel", "Block", "VisionTransformer", "create_model", "list_models"]

_LAZY = {"Intermediate": "vitlab.models.base", "VitlabModel": "vitlab.models.base", "Block": "vitlab.models.block",
         "VisionTransformer": "vitlab.models.vit", "create_model": "vitlab.models.factory",
         "list_models": "vitlab.models.factory"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitlab.models' has no attribute {name!r}")
