"""The generic name registry (used for parts and, in :mod:`vitlab.models.factory`, for models).

Names follow timm's conventions so that timm users feel at home.  Every lookup of an
unknown name raises a ``ValueError`` that lists the closest valid names.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional

__all__ = ["Registry", "check_kwargs", "accepted_keys"]


def _closest(name: str, choices: Iterable[str], n: int = 5) -> List[str]:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not close:  # fall back to substring matches so e.g. "swin" still helps
        close = [c for c in choices if name.lower() in c.lower()][:n]
    return close


def _named(params) -> List[str]:
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]


def accepted_keys(fn: Callable[..., Any]) -> Optional[List[str]]:
    """The keyword arguments ``fn`` accepts, or ``None`` when it takes any ``**kwargs``.  For a class
    whose ``__init__`` passes ``**kwargs`` on to its base class, the bases' named arguments are
    followed up the MRO (``torch.nn.Module`` and ``object`` end the walk)."""
    if not inspect.isclass(fn):
        params = list(inspect.signature(fn).parameters.values())
        return None if any(p.kind is p.VAR_KEYWORD for p in params) else _named(params)
    keys: List[str] = []
    for cls in fn.__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            return keys
        if "__init__" not in vars(cls):
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())
        keys += [k for k in _named(params) if k not in keys]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys
    return None


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

    def remove(self, name: str) -> None:
        """Unregister ``name`` (e.g. a part registered for one experiment or test)."""
        self.get(name)
        del self._entries[name]

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
