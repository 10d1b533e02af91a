"""The seams of attention, each a kind of part with its own registry.

"Multi-head attention" in the ViT literature differs along a few seams (see DESIGN.md):

* **projection** (:data:`PROJECTIONS`): where q, k, v come from;
* **grouping** (:data:`GROUPINGS`): which tokens attend to which (global, windows, stripes,
  spatially reduced keys, class-token queries);
* **core** (:data:`CORES`): q, k, v -> output (softmax, scaled cosine, focused linear);
* **modifier** (:data:`MODIFIERS`): acts on the logits or the probabilities (AttnScale, talking
  heads, re-attention);
* **position** (:data:`POSITION_BIASES`): a bias on the logits (relative table) or a term on the
  values (LePE).

A part is a small configuration object.  Its tensors live on the attention module that hosts it
(:class:`vitlab.layers.mha.MultiHeadAttention`), registered in :meth:`AttentionPart.setup` under
the names timm uses (``qkv``, ``relative_position_bias_table``, ``proj_l``, ...), so state-dict
keys stay timm's whatever the combination.  Every method takes that host as first argument.

Capabilities are class attributes, and :func:`check_compatible` is the one place that reads them.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from vitlab.registry import Registry, accepted_keys

__all__ = ["AttentionPart", "PROJECTIONS", "GROUPINGS", "CORES", "MODIFIERS", "POSITION_BIASES",
           "PartSpec", "build_part", "require_layout", "part_keys", "check_compatible", "PART_REGISTRIES"]

PROJECTIONS = Registry("projection")
GROUPINGS = Registry("grouping")
CORES = Registry("core")
MODIFIERS = Registry("modifier")
POSITION_BIASES = Registry("position bias")
PART_REGISTRIES = {"projection": PROJECTIONS, "grouping": GROUPINGS, "core": CORES, "modifier": MODIFIERS,
                   "position_bias": POSITION_BIASES}

# a part given by name, by (name, kwargs) or as a built part
PartSpec = Union[str, Tuple[str, Dict[str, Any]], "AttentionPart"]


class AttentionPart:
    """Base of every attention part.  ``name`` is its registry name (set by :func:`build_part`).

    Capabilities (class attributes, read by :func:`check_compatible`):

    * core: ``forms_matrix`` (False: never forms the N x N matrix, e.g. linear attention),
      ``token_modifiers`` (False: no modifier applies, e.g. XCiT's channel attention),
      ``takes_bias`` (accepts an additive logit bias or mask), ``linear_cost`` (families that
      adapt their grouping to linear-cost cores read it);
    * core or position: ``value_map`` (adds a term computed on the value map to the output rows, so
      queries and keys must be the same tokens);
    * modifier: ``needs_matrix`` (must see the explicit matrix), ``mixes_heads`` (couples heads);
    * grouping: ``same_shape`` (every group has the same token count: heads can be mixed),
      ``same_geometry`` (every group has the same grid: one relative table fits), ``takes_prefix``
      (can hold class tokens), ``has_mask`` (adds a mask to the logits), ``queries_prefix_only``,
      ``keys_are_queries`` (keys and values are the query tokens themselves, not reduced or other tokens),
      ``needs_matrix`` (the grouping forms the core's attention matrix itself, e.g. SepViT's across windows);
    * position: ``logit_bias`` (adds to the logits).
    """

    name: str = "?"
    kind: str = "part"
    value_map = False

    def setup(self, host) -> None:
        """Register this part's parameters and buffers on ``host``."""

    def __repr__(self) -> str:
        cfg = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"


def require_layout(host, part: "AttentionPart"):
    """The layout ``host`` is built for; a clear error when a part that sizes tables by it has none."""
    if host.layout is None:
        raise ValueError(f"{part.kind} '{part.name}' needs the token layout the attention is built for; "
                         "pass layout=TokenLayout(grid, num_prefix)")
    return host.layout


def build_part(registry: Registry, spec: Optional[PartSpec], routed: Dict[str, Any]) -> Optional[AttentionPart]:
    """A part from its spec.  ``routed`` holds loose keyword arguments (a mixer's ``mixer_kwargs``):
    each is handed to the parts whose constructor takes it (the caller checks that every key found
    a taker)."""
    if spec is None or isinstance(spec, AttentionPart):
        return spec
    name, kwargs = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
    valid = accepted_keys(registry.get(name)) or []
    kwargs = {**{k: v for k, v in routed.items() if k in valid}, **kwargs}
    part = registry.build(name, **kwargs)
    part.name = name
    return part


def takers(registry: Registry, specs: Iterable[Optional[PartSpec]]) -> List[str]:
    """Keyword arguments the named parts of ``specs`` accept (for routing and error messages)."""
    keys: List[str] = []
    for spec in specs:
        if isinstance(spec, (str, tuple)):
            keys += accepted_keys(registry.get(spec if isinstance(spec, str) else spec[0])) or []
        elif isinstance(spec, AttentionPart):
            keys += accepted_keys(type(spec)) or []
    return keys


def part_keys(projection: PartSpec, grouping: PartSpec, core: PartSpec, modifiers: Sequence[PartSpec] = (),
              positions: Sequence[PartSpec] = ()) -> List[str]:
    """The keyword arguments the constructors of these attention parts take."""
    return (takers(PROJECTIONS, [projection]) + takers(GROUPINGS, [grouping]) + takers(CORES, [core])
            + takers(MODIFIERS, modifiers) + takers(POSITION_BIASES, positions))


def _refuse(a: AttentionPart, b: AttentionPart, why: str) -> None:
    raise ValueError(f"{a.kind} '{a.name}' cannot be combined with {b.kind} '{b.name}': {why}")


def check_compatible(core: AttentionPart, grouping: AttentionPart, modifiers: Sequence[AttentionPart],
                     positions: Sequence[AttentionPart], num_prefix: int = 0) -> None:
    """The one place where attention parts are checked against each other (capabilities)."""
    for m in modifiers:
        if not getattr(core, "token_modifiers", True):
            _refuse(core, m, f"{core.name} attends over channels (a d x d map per head); {m.name} acts on the "
                             "attention between tokens")
        if m.needs_matrix and not core.forms_matrix:
            _refuse(core, m, f"{core.name} never forms the attention matrix; {m.name} needs it")
        if m.mixes_heads and not grouping.same_shape:
            _refuse(grouping, m, f"{m.name} mixes heads, but {grouping.name} puts heads in groups of different "
                                 "shapes here (a non-square map)")
    for p in positions:
        if p.logit_bias and not core.takes_bias:
            _refuse(core, p, f"{core.name} takes no additive logit bias")
        if p.logit_bias and not grouping.same_geometry:
            _refuse(grouping, p, f"{p.name} needs groups of one grid; {grouping.name} has several here")
    for p in (core, *positions):
        if p.value_map and not grouping.keys_are_queries:
            _refuse(grouping, p, f"{p.name} adds a term from the value map to each query row, but "
                                 f"{grouping.name} takes keys and values from other tokens than the queries here")
    if getattr(grouping, "needs_matrix", False) and not core.forms_matrix:
        _refuse(core, grouping, f"{core.name} never forms the attention matrix; {grouping.name} needs it to attend "
                                "across its groups")
    if grouping.has_mask and not core.takes_bias:
        _refuse(core, grouping, f"{core.name} cannot take the shifted-window mask (no additive logit bias)")
    if num_prefix and not grouping.takes_prefix:
        raise ValueError(f"grouping '{grouping.name}' cannot place {num_prefix} prefix (class) token(s) in its "
                         "groups; build the model without prefix tokens (e.g. class_token=False, global_pool='avg')")
