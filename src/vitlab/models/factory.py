"""The model registry: ``register_model``, ``create_model``, ``list_models`` (timm's names and
conventions).  Importing :mod:`vitlab.models` registers every family."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

from vitlab.registry import Registry, accepted_keys, check_kwargs

__all__ = ["MODELS", "register_model", "create_model", "list_models", "is_model", "model_entrypoint"]

MODELS = Registry("model")


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: register a model factory under its function name (as timm does)."""
    return MODELS.register()(fn)


# one module per family; each registers its recipes on import
FAMILIES = ("vit", "deit", "cait", "swin", "cswin", "pvt", "pvt_v2", "resnet", "alternet", "t2t", "cct",
            "vit_variants", "navit", "xcit", "video", "twins", "ats", "pit", "nest",
            "mobilevit", "sepvit", "regionvit", "lookupvit", "levit", "cvt", "crossformer", "scalablevit",
            "maxvit", "crossvit", "vit5", "beit", "eva02", "swinv2", "convit", "samvit")


def load_families() -> None:
    """Import every family module (each registers its models)."""
    import importlib

    for name in FAMILIES:
        importlib.import_module(f"vitlab.models.{name}")


_ensure_models_loaded = load_families


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    _ensure_models_loaded()
    return MODELS.names(pattern)


def is_model(name: str) -> bool:
    _ensure_models_loaded()
    return name in MODELS


def model_entrypoint(name: str) -> Callable[..., Any]:
    _ensure_models_loaded()
    return MODELS.get(name)


def create_model(name: str, pretrained: bool = False, features_only: bool = False,
                 out_indices: Optional[Union[int, Sequence[int]]] = None, **kwargs: Any):
    """Build a registered model by name.

    ``kwargs`` override the recipe: ``num_classes``, ``img_size``, ``in_chans``, and the
    part names ``mixer=``, ``norm=``, ``shortcut=``, ``featscale=``, ``init=``, plus any
    backbone argument (``depth=``, ``drop_path_rate=``, ...).

    ``features_only=True`` returns timm's feature extractor over the model contract
    (``timm``'s ``FeatureGetterNet``: the model pruned after the last tap, ``forward(x)`` -> the
    ``(B, C, H, W)`` maps of the taps ``out_indices``, ``feature_info.channels()`` /
    ``.reduction()`` / ``.module_name()``); ``out_indices`` as timm's (an int ``n``: the last ``n``
    taps; default: every stage of a hierarchical model, the last 3 blocks of an isotropic one).

    ``pretrained=True`` is not supported (vitlab never downloads at run time); load
    weights from a local file with ``checkpoint_path=`` (a vitlab checkpoint, a
    safetensors file or a plain state dict) instead.
    """
    if pretrained:
        raise ValueError(
            "pretrained=True would download weights, which vitlab never does at run time; "
            "pass checkpoint_path='/path/to/weights.(pth|safetensors)' or load a timm state dict "
            "with vitlab.interop.load_timm_weights"
        )
    fn = model_entrypoint(name)
    model_cls = getattr(fn, "model_cls", None)
    valid = accepted_keys(model_cls) if model_cls is not None else accepted_keys(fn)
    if valid is not None:
        check_kwargs(f"model '{name}'", kwargs, [k for k in valid if k not in ("architecture", "default_cfg")])
    if out_indices is not None and not features_only:
        raise ValueError(f"out_indices={out_indices!r} needs features_only=True")
    model = fn(**kwargs)
    from vitlab.layers.differential import number_differential_layers

    number_differential_layers(model)  # differential attention: lambda_init from each block's depth, any family
    return feature_extractor(model, out_indices) if features_only else model


def feature_extractor(model: Any, out_indices: Optional[Union[int, Sequence[int]]] = None):
    """timm's ``FeatureGetterNet`` over ``model`` (see :func:`create_model`)."""
    from timm.models._features import FeatureGetterNet

    if out_indices is None:
        out_indices = 3 if model.is_isotropic else len(model.feature_info)
    return FeatureGetterNet(model, out_indices=out_indices if isinstance(out_indices, int) else tuple(out_indices))
