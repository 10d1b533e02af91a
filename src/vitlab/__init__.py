"""vitlab: vision transformers from interchangeable parts; train, analyse and benchmark them."""
from typing import Any, Optional

from vitlab.models.factory import is_model, list_models, register_model
from vitlab.models import factory as _factory

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "is_model", "register_model", "__version__"]


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
                 pretrained_path: Optional[str] = None, **kwargs: Any):
    """Build a registered model by name (:func:`vitlab.models.factory.create_model`) and load weights from a
    local file -- vitlab never downloads (``pretrained=True`` raises):

    * ``checkpoint_path=``: the same model's weights (a vitlab checkpoint, a safetensors file, a plain state dict,
      timm's or an official release's keys), loaded strictly;
    * ``pretrained_path=``: weights to fine-tune from, adapted as ``vitlab train --pretrained`` does (a new head
      for another ``num_classes``, position tables for another size, the first conv for another ``in_chans``);
      what was loaded and adapted is logged and kept as ``model.pretrained_report``."""
    if checkpoint_path is not None and pretrained_path is not None:
        raise ValueError("give checkpoint_path= (strict) or pretrained_path= (adapted), not both")
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None) if features_only else None
    # the weights load into the whole model, then the extractor prunes it; out_indices without
    # features_only stays in kwargs, for the factory to refuse
    model = _factory.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        from vitlab.interop.checkpoint import load_weights

        load_weights(model, checkpoint_path)
    if pretrained_path is not None:
        import logging

        from vitlab.interop.checkpoint import load_pretrained

        model.pretrained_report = load_pretrained(model, pretrained_path)
        logging.getLogger("vitlab").info(model.pretrained_report.summary())
    return _factory.feature_extractor(model, out_indices) if features_only else model


create_model.__doc__ += "\n\n" + (_factory.create_model.__doc__ or "")
