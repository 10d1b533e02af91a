"""Conversion between vitlab and timm state dicts.

Each backbone family registers a pair of key/tensor converters with
:func:`register_timm_converter`; :func:`load_timm_weights` converts and loads strictly, so
a missing or unexpected key raises and names the keys.  Converters are pure functions on
dicts of tensors, so the round trip ``to_timm(from_timm(sd)) == sd`` is testable without timm.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple, Type

import torch
from torch import nn

__all__ = ["register_timm_converter", "register_identity_converter", "register_official_converter", "IdentityConverter", "load_timm_weights", "to_timm_state_dict", "TimmKeyError"]

StateDict = Dict[str, torch.Tensor]
_CONVERTERS: List[Tuple[Type[nn.Module], Callable, Callable]] = []


class TimmKeyError(KeyError):
    """Raised when a state dict does not match the model (missing or unexpected keys)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_timm_converter(model_cls: Type[nn.Module]):
    """Decorator for a class with static ``from_timm(sd, model) -> sd`` and ``to_timm(sd, model) -> sd``."""

    def deco(conv):
        _CONVERTERS.insert(0, (model_cls, conv.from_timm, conv.to_timm))
        return conv

    return deco


class IdentityConverter:
    """For backbones whose state-dict keys are timm's own: nothing to rename.  Parts timm lacks
    (FeatScale, AttnScale, other mixers) still make the strict load fail, naming the keys."""

    @staticmethod
    def from_timm(sd: StateDict, model: nn.Module) -> StateDict:
        return dict(sd)

    @staticmethod
    def to_timm(sd: StateDict, model: nn.Module) -> StateDict:
        return dict(sd)


def register_identity_converter(model_cls: Type[nn.Module]) -> None:
    """Register :class:`IdentityConverter` for a backbone that uses timm's key names."""
    register_timm_converter(model_cls)(IdentityConverter)


def register_rename_converter(model_cls: Type[nn.Module], from_timm: Tuple[str, str], to_timm: Tuple[str, str]
                              ) -> None:
    """A converter that only renames keys: ``from_timm`` and ``to_timm`` are ``(pattern, replacement)`` pairs
    of :func:`re.sub` applied to every key (e.g. timm's ``gamma_1`` -> vitlab's ``ls1.gamma`` and back)."""
    import re

    fwd, bwd = (re.compile(from_timm[0]), from_timm[1]), (re.compile(to_timm[0]), to_timm[1])
    _CONVERTERS.insert(0, (model_cls, lambda sd, model: {fwd[0].sub(fwd[1], k): v for k, v in sd.items()},
                           lambda sd, model: {bwd[0].sub(bwd[1], k): v for k, v in sd.items()}))


def register_rules_converter(model_cls: Type[nn.Module], from_timm, to_timm) -> None:
    """A converter that renames every key by the first matching rule (:func:`rename_first`): ``from_timm`` and
    ``to_timm`` are lists of ``(compiled pattern, replacement)`` (Twins, MobileViT)."""
    _CONVERTERS.insert(0, (model_cls, lambda sd, model: {rename_first(k, from_timm): v for k, v in sd.items()},
                           lambda sd, model: {rename_first(k, to_timm): v for k, v in sd.items()}))


def register_official_converter(model_cls: Type[nn.Module], is_official, from_official) -> None:
    """For a family timm lacks: the converter slot reads the official code's checkpoints (recognised by
    ``is_official(sd)``, renamed by ``from_official(sd)``); vitlab keys pass through, and saving to timm's keys
    is a ``ValueError`` (there are none), so saved model files keep vitlab's keys."""
    def to_timm(sd: StateDict, model: nn.Module) -> StateDict:
        raise ValueError(f"timm has no {type(model).__name__}: its state dict keeps vitlab's keys")

    _CONVERTERS.insert(0, (model_cls, lambda sd, model: from_official(sd) if is_official(sd) else dict(sd),
                           to_timm))


def rename_first(key: str, rules) -> str:
    """``key`` rewritten by the first ``(compiled pattern, replacement)`` of ``rules`` that matches it."""
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def _converter(model: nn.Module):
    """The converter of the nearest class in the model's MRO (a subclass's own wins over its base's, whatever the
    import order); for one class, the latest registration."""
    _ensure_loaded()
    for base in type(model).__mro__:
        for cls, fwd, bwd in _CONVERTERS:
            if cls is base:
                return fwd, bwd
    raise ValueError(f"no timm converter for {type(model).__name__}; models with one: "
                     f"{', '.join(sorted({c.__name__ for c, _, _ in _CONVERTERS}))}")


def _ensure_loaded() -> None:
    # each converter module imports its model family (interop depends on models, never the reverse)
    from vitlab.interop import timm_cait, timm_deit, timm_pvt_v2, timm_resnet, timm_swin, timm_vit  # noqa: F401
    from vitlab.interop import timm_xcit  # noqa: F401
    from vitlab.interop import timm_twins  # noqa: F401
    from vitlab.interop import timm_pit  # noqa: F401
    from vitlab.interop import timm_nest  # noqa: F401
    from vitlab.interop import timm_maxvit  # noqa: F401
    from vitlab.interop import timm_levit  # noqa: F401
    from vitlab.interop import timm_mobilevit  # noqa: F401
    from vitlab.interop import official  # noqa: F401  (families timm lacks: their official checkpoints' keys)
    from vitlab.interop import timm_crossvit  # noqa: F401
    from vitlab.interop import timm_swinv2  # noqa: F401
    from vitlab.interop import timm_eva  # noqa: F401
    from vitlab.interop import timm_samvit  # noqa: F401


def load_timm_weights(model: nn.Module, timm_state_dict: StateDict) -> nn.Module:
    """Load the state dict of the corresponding timm model into ``model`` in place (strict).

    Raises :class:`TimmKeyError` naming missing/unexpected keys and ``ValueError`` naming any
    tensor whose shape differs."""
    fwd, _ = _converter(model)
    sd = fwd({k: v for k, v in timm_state_dict.items()}, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise TimmKeyError(f"timm state dict does not match {type(model).__name__}: "
                           f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                           f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    bad = [f"{k}: timm {tuple(sd[k].shape)} vs vitlab {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError("shape mismatch loading timm weights: " + "; ".join(bad[:10]))
    model.load_state_dict(sd, strict=True)
    return model


def to_timm_state_dict(model: nn.Module) -> StateDict:
    """The state dict of ``model`` with timm's key names and layouts."""
    _, bwd = _converter(model)
    return bwd({k: v.detach().clone() for k, v in model.state_dict().items()}, model)
