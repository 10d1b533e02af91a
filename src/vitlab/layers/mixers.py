"""Token mixers by name: attention shorthands and non-attention mixers.

* ``softmax``, ``cosine``, ``focused_linear``, ``attnscale``: :class:`MultiHeadAttention` with that
  core (``attnscale``: softmax + the AttnScale modifier);
* ``pooling``: PoolFormer's average-pool token mixer ("MetaFormer Is Actually What You Need for
  Vision", Yu et al., CVPR 2022).

Every mixer is called as ``mixer(x (B, N, C), layout) -> (B, N, C)``.  Backbones describe the
attention they want (grouping, projection, position parts) and :class:`MixerSpec` builds the user's
choice of mixer/core/modifiers/position parts into it; a non-attention mixer mixes over the whole map
and takes none of the attention-only parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from vitlab.layers.attn_parts import CORES, MODIFIERS, POSITION_BIASES, part_keys
from vitlab.layers.layout import TokenLayout, as_layout
from vitlab.layers.mha import MultiHeadAttention
from vitlab.registry import Registry, accepted_keys, check_kwargs

__all__ = ["MIXERS", "Pooling", "MixerSpec", "create_mixer", "attention_shorthand", "check_stage_kwargs",
           "position_specs"]

MIXERS = Registry("mixer")


def attention_shorthand(core: str, modifiers: Sequence[str] = ()):
    """A mixer factory that is :class:`MultiHeadAttention` with ``core`` and ``modifiers``."""

    def factory(dim: int, num_heads: int = 8, **kwargs: Any) -> MultiHeadAttention:
        kwargs.setdefault("core", core)
        kwargs["modifiers"] = tuple(kwargs.get("modifiers", ())) + tuple(modifiers)
        return MultiHeadAttention(dim, num_heads, **kwargs)

    factory.attention = True
    factory.core_name, factory.modifier_names = core, tuple(modifiers)
    factory.__doc__ = f"Multi-head attention with the {core!r} core{' and ' + ', '.join(modifiers) if modifiers else ''}."
    return factory


MIXERS.register("softmax")(attention_shorthand("softmax"))
MIXERS.register("cosine")(attention_shorthand("cosine"))
MIXERS.register("focused_linear")(attention_shorthand("focused_linear"))
MIXERS.register("attnscale")(attention_shorthand("softmax", ("attnscale",)))


@MIXERS.register("pooling")
class Pooling(nn.Module):
    """``AvgPool(x) - x`` on the token map (3x3, stride 1, ``count_include_pad=False``): PoolFormer's
    token mixer (Yu et al., CVPR 2022).  Prefix tokens pass through unchanged (output 0 for them, so the
    residual keeps them)."""

    attention = False

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        if pool_size % 2 != 1:
            raise ValueError(f"pool_size must be odd, got {pool_size}")
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        layout = layout or as_layout(x.shape[1])
        fm = layout.to_map(x)
        y = layout.from_map(self.pool(fm) - fm)
        p = layout.num_prefix
        return torch.cat([x.new_zeros(x.shape[0], p, x.shape[2]), y], dim=1) if p else y


def is_attention(name: str) -> bool:
    return bool(getattr(MIXERS.get(name), "attention", False))


def position_specs(specs: Any) -> tuple:
    """Position parts as a tuple of specs: ``None``, one name, one ``(name, kwargs)`` or a sequence of those."""
    if specs is None:
        return ()
    if isinstance(specs, str) or (isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[1], dict)):
        return (specs,)
    if not isinstance(specs, (tuple, list)):
        raise ValueError(f"attn_position must be position part names or (name, kwargs) pairs, got {specs!r}")
    return tuple(tuple(s) if isinstance(s, list) else s for s in specs)


def _position_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return spec[0]
    raise ValueError(f"an attn_position entry must be a position part name or a (name, kwargs) pair, got {spec!r}")


@dataclass
class MixerSpec:
    """The user's token-mixer choice, the same on every family: ``mixer`` (a :data:`MIXERS` name),
    ``core`` (a :data:`~vitlab.layers.attn_parts.CORES` name overriding the mixer's), ``modifiers``
    (added after the family's own), ``kwargs`` (``mixer_kwargs``: part options such as ``tau``) and
    ``position`` (the families' ``attn_position``: :data:`~vitlab.layers.attn_parts.POSITION_BIASES` names or
    ``(name, kwargs)`` pairs, e.g. ``("rope",)``, added after the family's own position parts such as Swin's
    relative table; each part's capabilities decide where it applies, see :mod:`vitlab.layers.rope`)."""

    mixer: str = "softmax"
    core: Optional[str] = None
    modifiers: Sequence[str] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    position: Sequence[Any] = ()

    def __post_init__(self):
        MIXERS.get(self.mixer)
        if self.core is not None:
            CORES.get(self.core)
        for m in self.modifiers:
            MODIFIERS.get(m)
        self.position = position_specs(self.position)
        for p in self.position:
            POSITION_BIASES.get(_position_name(p))
        if (self.core or self.modifiers or self.position) and not self.attention:
            raise ValueError(f"mixer '{self.mixer}' is not attention: core={self.core!r} / modifiers="
                             f"{tuple(self.modifiers)} / attn_position={self.position} do not apply; use an "
                             "attention mixer (softmax, ...)")

    @property
    def attention(self) -> bool:
        return is_attention(self.mixer)

    @property
    def core_part(self):
        """The core class this spec resolves to (for capability questions), or ``None``."""
        if not self.attention:
            return None
        return CORES.get(self.core or MIXERS.get(self.mixer).core_name)

    @property
    def linear_cost(self) -> bool:
        core = self.core_part
        return bool(core is not None and core.linear_cost)

    def check_grid(self, layout: TokenLayout) -> None:
        """A mixer that convolves or pools a 2-D token map (a non-attention mixer, unless it declares
        ``any_grid = True``; a core with ``map_rank = 2``, e.g. FLatten's depthwise conv) cannot run on tokens
        laid out otherwise (a video's 3-D grid, NaViT's packed sequences): one clear refusal."""
        rank = len(layout.grid)
        core = self.core_part
        if not self.attention and not getattr(MIXERS.get(self.mixer), "any_grid", False):
            what = f"mixer '{self.mixer}' mixes tokens on a 2-D map"
        elif core is not None and getattr(core, "map_rank", None) not in (None, rank):
            what = f"core '{self.core or MIXERS.get(self.mixer).core_name}' convolves a {core.map_rank}-D token map"
        else:
            return
        raise ValueError(f"{what}; this model's tokens lie on a {rank}-D grid {tuple(layout.grid)} (use an "
                         "attention mixer such as softmax)")

    def part_keys(self, modifiers: Sequence = (), **attention: Any) -> List[str]:
        """The keyword arguments the parts of this mixer (in a family asking ``attention``) accept."""
        fn = MIXERS.get(self.mixer)
        if not self.attention:
            return [k for k in accepted_keys(fn) or [] if k != "dim"]
        return part_keys(attention.get("projection", "linear"), attention.get("grouping", "global"),
                         self.core or fn.core_name, [*modifiers, *self.modifiers, *fn.modifier_names],
                         self.positions(attention))

    def positions(self, attention: Dict[str, Any]) -> tuple:
        """The position parts of an attention mixer: the family's (``attention["position"]``), then the user's."""
        return (*position_specs(attention.get("position")), *self.position)

    def build(self, dim: int, num_heads: int, layout: Optional[TokenLayout] = None, *, modifiers: Sequence = (),
              lenient: bool = False, **attention: Any) -> nn.Module:
        """The mixer; ``attention`` (grouping, projection, position, qkv_bias, drops, ...) and the
        family's ``modifiers`` apply to attention mixers only.  ``lenient``: hand the mixer only the
        keyword arguments its parts take (a family whose stages differ checks the union itself)."""
        if layout is not None and len(layout.grid) != 2:
            self.check_grid(layout)
        kwargs = self.kwargs
        if lenient:
            keys = set(self.part_keys(modifiers, **attention))
            kwargs = {k: v for k, v in kwargs.items() if k in keys}
        if self.position:  # attention only (__post_init__ refuses the others)
            attention = {**attention, "position": self.positions(attention)}
        return create_mixer(self.mixer, dim, num_heads, layout=layout, core=self.core,
                            modifiers=tuple(modifiers) + tuple(self.modifiers), family=attention, **kwargs)


def check_stage_kwargs(kwargs: Dict[str, Any], stages: Sequence[tuple]) -> None:
    """Every key of ``kwargs`` must be taken by the parts of at least one stage; ``stages`` holds
    ``(spec, modifiers, attention)`` per stage (as for :meth:`MixerSpec.build`)."""
    valid = set()
    for spec, modifiers, attention in stages:
        valid.update(spec.part_keys(modifiers, **attention))
    check_kwargs("mixer_kwargs", kwargs, valid)


def create_mixer(name: str, dim: int, num_heads: int = 8, layout: Optional[TokenLayout] = None,
                 core: Optional[str] = None, modifiers: Sequence = (), family: Optional[Dict[str, Any]] = None,
                 num_tokens: Optional[int] = None, **mixer_kwargs: Any) -> nn.Module:
    """Build a token mixer by name.  ``mixer_kwargs`` are the user's part options (checked: an unknown
    key raises ``ValueError`` listing the valid ones); ``family`` holds what the backbone asks of an
    attention mixer (grouping, projection, position, qkv_bias, attn_drop, proj_drop, ...)."""
    fn = MIXERS.get(name)
    if not getattr(fn, "attention", False):
        valid = accepted_keys(fn) or []
        check_kwargs(f"mixer '{name}'", mixer_kwargs, [k for k in valid if k != "dim"])
        return fn(dim, **mixer_kwargs)
    kw = dict(family or {})
    if num_tokens is not None and layout is None:
        kw["num_tokens"] = num_tokens
    if core is not None:
        kw["core"] = core
    return fn(dim, num_heads, layout=layout, modifiers=tuple(modifiers), **kw, **mixer_kwargs)
