"""Name registries: models (``create_model`` / ``list_models``) and parts (mixers, norms, ...).

Names follow timm's conventions so that timm users feel at home.  Every lookup of an
unknown name raises a ``ValueError`` that lists the closest valid names.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional

__all__ = ["Registry", "check_kwargs", "accepted_keys", "register_model", "create_model", "list_models", "is_model", "model_entrypoint"]


def _closest(name: str, choices: Iterable[str], n: int = 5) -> List[str]:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not close:  # fall back to substring matches so e.g. "swin" still helps
        close = [c for c in choices if name.lower() in c.lower()][:n]
    return close


def accepted_keys(fn: Callable[..., Any]) -> Optional[List[str]]:
    """The keyword arguments ``fn`` accepts, or ``None`` when it takes ``**kwargs``."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = list(inspect.signature(target).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def check_kwargs(what: str, kwargs: Dict[str, Any], valid: Iterable[str]) -> None:
    """Raise ``ValueError`` naming every key of ``kwargs`` not in ``valid`` and listing the valid keys."""
    valid = list(valid)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {', '.join(map(repr, c))}?)" if (c := difflib.get_close_matches(k, valid, 2))
                 else repr(k) for k in unknown]
        raise ValueError(f"unknown keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)} for "
                         f"{what}; valid keys: {', '.join(sorted(valid))}")


class Registry:
    """A name -> factory table with helpful errors.

    ``kind`` is used in error messages ("unknown mixer 'cosin'; closest: cosine").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: Optional[str] = None):
        def deco(obj):
            key = name or getattr(obj, "__name__")
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = obj
            return obj
        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}: {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            close = _closest(name, self._entries)
            hint = f"; closest valid names: {', '.join(close)}" if close else ""
            raise ValueError(
                f"unknown {self.kind} '{name}'{hint} (all {len(self._entries)} names: "
                f"{', '.join(sorted(self._entries)) if len(self._entries) <= 20 else 'see list_models()'})"
            ) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``, refusing keyword arguments the factory does not take
        (a ``ValueError`` that lists the valid keys) instead of a ``TypeError`` or silence."""
        fn = self.get(name)
        valid = accepted_keys(fn)
        if valid is not None:
            check_kwargs(f"{self.kind} '{name}'", kwargs, valid)
        return fn(*args, **kwargs)

    def names(self, pattern: str = "*") -> List[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


MODELS = Registry("model")


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: register a model factory under its function name (as timm does)."""
    return MODELS.register()(fn)


def _ensure_models_loaded() -> None:
    import vitlab.models  # noqa: F401  (importing registers every family)


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


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs: Any):
    """Build a registered model by name.

    ``kwargs`` override the recipe: ``num_classes``, ``img_size``, ``in_chans``, and the
    part names ``mixer=``, ``norm=``, ``shortcut=``, ``featscale=``, ``init=``, plus any
    backbone argument (``depth=``, ``drop_path_rate=``, ...).

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
    model = fn(**kwargs)
    if checkpoint_path is not None:
        from vitlab.interop.checkpoint import load_weights

        load_weights(model, checkpoint_path)
    return model
