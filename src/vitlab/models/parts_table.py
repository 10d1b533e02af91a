"""Which part runs in which family: the table of ``docs/parts.md``, generated.

Every cell comes from building the family's small example model with that one part on the
``meta`` device (no memory, no initialisation cost): the capability checks of
:func:`vitlab.layers.attn_parts.check_compatible` and of the family decide, so the table cannot
drift from the code.  ``vitlab models --parts`` prints it; a test checks ``docs/parts.md`` is current.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from vitlab.layers import CORES, GROUPINGS, MIXERS, MODIFIERS, NORMS, POSITION_BIASES, PROJECTIONS
from vitlab.layers.shortcut import SHORTCUTS
from vitlab.models.factory import create_model

__all__ = ["FAMILY_EXAMPLES", "PART_OPTIONS", "parts_matrix", "parts_markdown"]

# family -> (model name, small-size overrides, input size (C, H, W))
FAMILY_EXAMPLES: Dict[str, Tuple[str, Dict[str, Any], Tuple[int, int, int]]] = {
    "vit": ("vit_tiny_patch4_32", dict(depth=2, embed_dim=32, num_heads=2), (3, 32, 32)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224",
                       dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10), (3, 32, 32)),
    "cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, depth=2, depth_token_only=1, embed_dim=32, num_heads=2,
                                    num_classes=10), (3, 32, 32)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                                                  window_size=2, num_classes=10), (3, 32, 32)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                                               window_size=2, num_classes=10), (3, 32, 32)),
    "cswin": ("cswin_tiny_224", dict(img_size=32, embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 2),
                                     split_size=(2, 2, 2), num_classes=10), (3, 32, 32)),
    "pvt": ("pvt_tiny", dict(img_size=32, depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2),
                             sr_ratios=(2, 1), num_classes=10), (3, 32, 32)),
    "pvt_v2": ("pvt_v2_b0", dict(img_size=32, depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), mlp_ratios=(2, 2),
                                 sr_ratios=(2, 1), num_classes=10), (3, 32, 32)),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                          num_classes=10), (3, 32, 32)),
    "t2t": ("t2t_vit_t_14", dict(img_size=32, depth=2, embed_dim=32, num_heads=2, token_dim=16, num_classes=10),
            (3, 32, 32)),
    "cct": ("cct_7_3x1_32", dict(depth=2, embed_dim=32, num_heads=2), (3, 32, 32)),
    "navit": ("navit_tiny_patch4", dict(img_size=32, depth=2, embed_dim=32, num_heads=2), (3, 32, 32)),
    "video": ("vivit_base_st", dict(img_size=16, num_frames=4, patch_size=4, tubelet_size=2, depth=2, embed_dim=24,
                                    num_heads=2, num_classes=10), (3, 4, 16, 16)),
    "twins": ("twins_svt_small", dict(img_size=32, depths=(2, 2), embed_dims=(16, 32), num_heads=(1, 2),
                                      mlp_ratios=(2, 2), sr_ratios=(2, 1), wss=(2, 2), num_classes=10), (3, 32, 32)),
    "pit": ("pit_ti_224", dict(img_size=32, patch_size=8, stride=4, base_dims=(8, 8, 8), depth=(1, 1, 1),
                               heads=(2, 2, 4), num_classes=10), (3, 32, 32)),
    "nest": ("nest_tiny", dict(img_size=32, embed_dims=(16, 32), num_heads=(2, 2), depths=(1, 1), num_classes=10),
             (3, 32, 32)),
    "levit": ("levit_128s", dict(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1),
                                 num_classes=10), (3, 32, 32)),
    "cvt": ("cvt_13_224", dict(img_size=32, embed_dims=(16, 32, 32), depths=(1, 1, 1), num_heads=(1, 2, 2), mlp_ratios=2,
                               num_classes=10), (3, 32, 32)),
    "mobilevit": ("mobilevit_xxs", dict(img_size=32, stem_chs=8, channels=(8, 16, 16), depths=(1, 1, 1),
                                        strides=(1, 2, 2), transformer_dims=(0, 16, 32), transformer_depths=(0, 1, 1),
                                        num_heads=2, num_features=32, num_classes=10), (3, 32, 32)),
    "crossformer": ("crossformer_tiny", dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 2), group_size=2,
                                             num_classes=10), (3, 32, 32)),
    "scalablevit": ("scalablevit_small", dict(img_size=32, embed_dims=(16, 32), depths=(2, 2), num_heads=(2, 2),
                                              sr_ratios=(2, 1), wss=(2, 2), c_ratios=(1.25, 1.0), head_hidden=0,
                                              num_classes=10), (3, 32, 32)),
    "sepvit": ("sepvit_tiny", dict(img_size=32, embed_dims=(16, 32), num_heads=(2, 2), depths=(2, 2), mlp_ratios=(2, 2),
                                   window_size=((2,), (2, 4)), num_classes=10), (3, 32, 32)),
    "regionvit": ("regionvit_tiny", dict(img_size=32, embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 2),
                                         window_size=2, num_classes=10), (3, 32, 32)),
    "lookupvit": ("lookupvit_base_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                                     compressed_size=3, num_classes=10), (3, 32, 32)),
    "maxvit": ("maxvit_tiny_tf_224", dict(img_size=32, embed_dim=(16, 32), depths=(1, 1), stem_width=8,
                                          head_hidden_size=16, dim_head=8, window_size=2, grid_size=2, num_classes=10),
               (3, 32, 32)),
    "crossvit": ("crossvit_9_240", dict(img_size=30, patch_size=(3, 4), embed_dim=(16, 32), depth=((1, 1, 0), (1, 1, 0)),
                                        num_heads=(2, 2), num_classes=10), (3, 30, 30)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                           num_classes=10), (3, 32, 32)),
    "samvit": ("samvit_base_patch16", dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2, window_size=3,
                                           global_attn_indexes=(1,), neck_chans=16, num_classes=10), (3, 32, 32)),
    "convit": ("convit_tiny", dict(img_size=32, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=16, num_heads=2,
                                   num_classes=10), (3, 32, 32)),
    "alternet": ("alternet50_cifar", dict(layers=(1, 1, 2, 2), msa_counts=(0, 0, 1, 1), heads=(1, 1, 2, 2),
                                          head_dim=8, window_size=2, num_classes=10), (3, 32, 32)),
}

# create_model keyword -> registry of its names (``modifiers`` takes a tuple of names)
PART_OPTIONS = {"core": CORES, "modifiers": MODIFIERS, "mixer": MIXERS, "norm": NORMS, "branch_scale": SHORTCUTS}


def _cell(family: str, key: str, value: Any) -> str:
    name, small, _ = FAMILY_EXAMPLES[family]
    try:
        with torch.device("meta"):
            create_model(name, **small, **{key: value})
    except ValueError as exc:
        return "no: " + str(exc).replace("|", "/")
    return "yes"


def parts_matrix() -> List[Tuple[str, str, Dict[str, str]]]:
    """``[(kind, part name, {family: "yes" | "no: <the refusal>"})]`` for every registered part."""
    rows = []
    for key, registry in PART_OPTIONS.items():
        for part in registry.names():
            value = (part,) if key == "modifiers" else part
            rows.append((key, part, {f: _cell(f, key, value) for f in FAMILY_EXAMPLES}))
    rows.append(("featscale", "True", {f: _cell(f, "featscale", True) for f in FAMILY_EXAMPLES}))
    for position in ("rope", "beit_relative", "cpb", "decomposed_relative"):
        rows.append(("attn_position", position, {f: _cell(f, "attn_position", (position,)) for f in FAMILY_EXAMPLES}))
    for wiring in ("pre", "post", "end", "parallel", "parallel_scaling", "res_post"):  # Block wirings (not CaiT's "prefix")
        rows.append(("wiring", wiring, {f: _cell(f, "wiring", wiring) for f in FAMILY_EXAMPLES}))
    return rows


def _capabilities() -> List[str]:
    lines = ["| kind | part | capabilities |", "|---|---|---|"]
    flags = {"core": ("forms_matrix", "takes_bias", "linear_cost", "value_map"),
             "modifier": ("needs_matrix", "mixes_heads"),
             "grouping": ("same_shape", "same_geometry", "takes_prefix", "queries_prefix_only", "keys_are_queries"),
             "position bias": ("logit_bias", "value_map"), "projection": ()}
    shown = lambda v: "per instance" if isinstance(v, property) else v  # noqa: E731 (set from the part's options)
    for registry in (PROJECTIONS, GROUPINGS, CORES, MODIFIERS, POSITION_BIASES):
        for name in registry.names():
            cls = registry.get(name)
            caps = ", ".join(f"{f}={shown(getattr(cls, f))}" for f in flags[registry.kind])
            lines.append(f"| {registry.kind} | `{name}` | {caps or '-'} |")
    return lines


def parts_markdown() -> str:
    fams = list(FAMILY_EXAMPLES)
    out = ["# Parts x families", "",
           "Generated by `vitlab models --parts` (`vitlab.models.parts_table`): each cell builds the family's",
           "small example model with that one part; `yes` means it builds (the matrix test trains it one step and",
           "checks that every parameter gets a gradient), `no` quotes the one-line refusal.  Do not edit by hand.",
           "", "| option | part | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    notes: Dict[str, int] = {}
    for key, part, cells in parts_matrix():
        row = []
        for f in fams:
            c = cells[f]
            if c != "yes":
                notes.setdefault(c, len(notes) + 1)
                c = f"no [{notes[c]}]"
            row.append(c)
        out.append(f"| `{key}` | `{part}` | " + " | ".join(row) + " |")
    out += ["", "Refusals:", ""] + [f"{i}. {msg[4:]}" for msg, i in notes.items()]
    out += ["", "## Attention parts and their capabilities", "",
            "Read in one place, `vitlab.layers.attn_parts.check_compatible`.", ""] + _capabilities()
    return "\n".join(out) + "\n"
