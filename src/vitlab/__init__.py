"""vitlab: vision transformers from interchangeable parts; train, analyse and benchmark them."""
from typing import Any, Optional

from vitlab.models.factory import is_model, list_models, register_model
from vitlab.models import factory as _factory

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "is_model", "register_model", "__version__"]


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs: Any):
    """Build a registered model by name (:func:`vitlab.models.factory.create_model`) and, with
    ``checkpoint_path=``, load its weights from a local file (a vitlab checkpoint, a safetensors file
    or a plain state dict) -- vitlab never downloads (``pretrained=True`` raises)."""
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None) if features_only else None
    # the weights load into the whole model, then the extractor prunes it; out_indices without
    # features_only stays in kwargs, for the factory to refuse
    model = _factory.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        from vitlab.interop.checkpoint import load_weights

        load_weights(model, checkpoint_path)
    return _factory.feature_extractor(model, out_indices) if features_only else model


create_model.__doc__ += "\n\n" + (_factory.create_model.__doc__ or "")
