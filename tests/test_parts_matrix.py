"""The design's executable claim: every part plugs into every backbone, by construction.

Parts registered here, inside the test (a new attention core, a new probability modifier, a new
non-attention token mixer, a new norm), run in every family at a small size: forward and backward
are finite and every parameter receives a gradient -- or the family refuses the part at
construction with one ``ValueError`` that names the part and the reason.
"""
import math

import pytest
import torch
from torch import nn

import vitlab
from vitlab.layers import CORES, MIXERS, MODIFIERS, NORMS, TokenLayout
from vitlab.layers.cores import Core
from vitlab.layers.modifiers import _Modifier

from vitlab.models.parts_table import FAMILY_EXAMPLES as FAMILIES, PART_OPTIONS  # noqa: E402


# -- parts a user writes in a few lines ---------------------------------------------------------------
class L2Core(Core):
    """A new core: softmax of negative squared distances, ``-|q - k|^2 / sqrt(d)`` (L2 attention)."""

    def logits(self, host, q, k):
        return -torch.cdist(q, k).pow(2) * self.scale(host)

    def fused(self, host, q, k, v, bias, dropout_p):
        logits = self.logits(host, q, k) + (0 if bias is None else bias)
        return logits.softmax(-1) @ v


class HeadTemperature(_Modifier):
    """A new modifier: a learnable temperature per head on the logits (needs the matrix)."""

    def setup(self, host):
        host.head_temp = nn.Parameter(torch.ones(host.num_heads))

    def on_logits(self, host, logits, heads):
        return logits * host.head_temp[heads].view(1, -1, 1, 1)


class DWConvMixer(nn.Module):
    """A new non-attention token mixer: a 3x3 depthwise conv on the token map."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, layout=None):
        fm = layout.to_map(x)
        y = layout.from_map(self.conv(fm))
        p = layout.num_prefix
        return torch.cat([x.new_zeros(x.shape[0], p, x.shape[2]), y], dim=1) if p else y


class ScaleNorm(nn.Module):
    """A new norm: ``g * x / |x|`` ("Transformers without Tears", Nguyen & Salazar, 2019)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.g, self.eps = nn.Parameter(torch.tensor(math.sqrt(dim))), eps

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


@pytest.fixture
def new_parts():
    """The parts below, registered for one test (removed after it: other tests see the built-in set)."""
    CORES.register("l2_test")(L2Core)
    MODIFIERS.register("head_temp_test")(HeadTemperature)
    MIXERS.register("dwconv_test")(DWConvMixer)
    NORMS.register("scalenorm_test")(ScaleNorm)
    yield
    for reg, name in ((CORES, "l2_test"), (MODIFIERS, "head_temp_test"), (MIXERS, "dwconv_test"),
                      (NORMS, "scalenorm_test")):
        reg.remove(name)


def run_family(family, **parts):
    """Build the family's small model with ``parts``; forward + backward; every parameter gets a finite
    gradient.  Returns the model."""
    name, small, size = FAMILIES[family]
    torch.manual_seed(0)
    model = vitlab.create_model(name, **small, **parts)
    model.train()
    x = torch.randn(2, *size)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 10) and torch.isfinite(out).all(), (family, parts)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{family} {parts}: no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters()), (family, parts)
    return model


# (family, part kind, part name) a family refuses, with the words its one-line error must contain
REFUSED = {
    ("alternet", "norm", "*"): ("BatchNorm",),
    ("alternet", "wiring", "post"): ("pre-activation",),
    ("alternet", "wiring", "parallel"): ("pre-activation",),
    ("alternet", "wiring", "parallel_scaling"): ("pre-activation",),
    # ViT-22B's one-norm parallel block: CSwin's norm layouts, XCiT's LPI branch and LeViT's norm-free blocks refuse it
    ("cswin", "wiring", "parallel_scaling"): ("norm_layout must be one of",),
    ("xcit", "wiring", "parallel_scaling"): ("local_mixer",),
    ("levit", "wiring", "parallel_scaling"): ("no norm outside their branches",),
    # differential attention holds two logit maps per head: CaiT's talking heads cannot mix them
    ("cait", "core", "differential"): ("talking_heads", "two logit maps per head"),
    # CaiT's self-attention talks across heads (talking heads) unless talking_heads=False
    ("cait", "core", "focused_linear"): ("talking_heads", "never forms the attention matrix"),
    ("cait", "mixer", "focused_linear"): ("talking_heads", "never forms the attention matrix"),
    # XCiT's cross-covariance attention is over channels: token-attention modifiers are refused
    ("xcit", "modifiers", "*"): ("attends over channels",),
    ("xcit", "wiring", "parallel"): ("local_mixer",),
    **{("cait", kind, "cross_covariance"): ("attends over channels", "talking_heads") for kind in ("core", "mixer")},
    **{("navit", kind, "cross_covariance"): ("takes no attention mask",) for kind in ("core", "mixer")},
    # PVT's spatially reduced keys: a query has no key of its own, so LSA has no diagonal to mask
    **{(fam, "modifiers", "lsa"): ("spatial_reduction", "no diagonal") for fam in ("pvt", "pvt_v2", "twins")},  # XCiT's LPI branch sits between attention and MLP
    # LeViT: no norm outside the branches (post = pre), an additive offset bias, subsampled queries
    ("levit", "wiring", "post"): ("no norm outside their branches",),
    **{("levit", kind, name): ("offset", "no additive logit bias") for kind in ("core", "mixer")
       for name in ("focused_linear", "cross_covariance")},
    ("levit", "modifiers", "lsa"): ("subsample", "no diagonal"),
    ("cvt", "modifiers", "lsa"): ("projection 'conv'", "needs every query to be a key"),
    ("scalablevit", "modifiers", "lsa"): ("scalable_reduction", "no diagonal"),
    **{("regionvit", kind, name): ("regional_relative", "no additive logit bias") for kind in ("core", "mixer")
       for name in ("focused_linear", "cross_covariance")},
    # tokens without a 2-D map (a video's 3-D grid; NaViT's packed sequences): map convolutions and pooling
    **{(fam, kind, name): ("lie on a", "-D grid") for fam in ("video", "navit")
       for kind, name in (("mixer", "pooling"), ("mixer", "dwconv_test"), ("mixer", "focused_linear"),
                          ("core", "focused_linear"))},
    # ConViT's GPSA blocks (modifier 'gpsa') need a softmax matrix; gpsa needs one 2-D grid whose queries are the keys
    **{("convit", kind, name): ("modifier 'gpsa'",) for kind, name in (
        ("core", "focused_linear"), ("core", "differential"), ("core", "cross_covariance"),
        ("mixer", "focused_linear"), ("mixer", "cross_covariance"))},
    **{(fam, "modifiers", "gpsa"): words for fam, words in (
        ("swin", ("shifted-window mask",)), ("swinv2", ("shifted-window mask",)), ("cswin", ("several grids",)),
        ("pvt", ("spatial_reduction", "queries are not the keys")), ("pvt_v2", ("spatial_reduction", "not the keys")),
        ("twins", ("spatial_reduction", "not the keys")), ("scalablevit", ("scalable_reduction", "not the keys")),
        ("levit", ("subsample", "not the keys")), ("cvt", ("projection 'conv'", "every query to be a key")),
        ("navit", ("no common grid",)), ("video", ("2-D token grid",)), ("regionvit", ("regional", "share out")))},
}

NEW_PARTS = [dict(core="l2_test"), dict(modifiers=("head_temp_test",)), dict(mixer="dwconv_test"),
             dict(norm="scalenorm_test")]


def run_or_refused(family, words, part, **parts):
    """:func:`run_family` with ``parts``; where ``words`` is given, instead the one ``ValueError`` at construction,
    naming ``part`` and every one of ``words`` (then ``None``)."""
    if words is None:
        return run_family(family, **parts)
    with pytest.raises(ValueError) as err:
        run_family(family, **parts)
    msg = str(err.value)
    assert part in msg and all(w in msg for w in words), msg
    return None


def _expect(family, parts):
    kind, value = next(iter(parts.items()))
    name = str(value).strip("(),'")
    return run_or_refused(family, REFUSED.get((family, kind, name), REFUSED.get((family, kind, "*"))), name, **parts)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parts", NEW_PARTS, ids=lambda d: next(iter(d.values())) if isinstance(d, dict) else d)
def test_a_part_no_family_was_taught_runs_in_every_family(new_parts, family, parts):
    model = _expect(family, parts)
    if model is not None:
        assert_uses(model, parts)


def assert_uses(model, parts):
    """The model really holds the part asked for (not silently the default)."""
    from vitlab.layers import ChannelScale, FeatScale

    kind, value = next(iter(parts.items()))
    mods = list(model.modules())
    checks = {
        "core": lambda: any(getattr(getattr(m, "core", None), "name", None) == value for m in mods),
        "modifiers": lambda: any(value[0] in [p.name for p in getattr(m, "modifiers", [])] for m in mods),
        "mixer": lambda: any(isinstance(m, MIXERS.get(value)) if isinstance(MIXERS.get(value), type) else
                             getattr(getattr(m, "core", None), "name", None) == MIXERS.get(value).core_name
                             for m in mods),
        "norm": lambda: any(isinstance(m, NORMS.get(value)) for m in mods),
        "branch_scale": lambda: any(isinstance(m, ChannelScale) for m in mods) == (value != "plain"),
        "featscale": lambda: any(isinstance(m, FeatScale) for m in mods),
        "wiring": lambda: any(getattr(m, "wiring", None) == value for m in mods),
    }
    assert checks[kind](), f"{parts} not found in {type(model).__name__}"


# every registered part of every kind a model takes by name (a new part is in this list by registering it)
BUILT_IN = ([{key: ((name,) if key == "modifiers" else name)} for key, reg in PART_OPTIONS.items()
             for name in reg.names()]
            + [dict(featscale=True)] + [dict(wiring=w) for w in ("pre", "post", "parallel", "parallel_scaling")])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parts", BUILT_IN, ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))}")
def test_every_built_in_part_in_every_family(family, parts):
    model = _expect(family, parts)
    if model is not None:
        assert_uses(model, parts)


def test_capability_errors_name_both_parts_and_the_reason():
    with pytest.raises(ValueError, match="core 'focused_linear' cannot be combined with modifier 'talking_heads': "
                                         "focused_linear never forms the attention matrix; talking_heads needs it"):
        vitlab.create_model("vit_tiny_patch4_32", core="focused_linear", modifiers=("reattention", "talking_heads")
                            if False else ("talking_heads",))
    with pytest.raises(ValueError, match="grouping 'window' cannot place 1 prefix"):
        from vitlab.layers import MultiHeadAttention
        MultiHeadAttention(16, 2, grouping="window", window_size=2, layout=TokenLayout((4, 4), 1))
    with pytest.raises(ValueError, match="mixer 'pooling' is not attention"):
        vitlab.create_model("vit_tiny_patch4_32", mixer="pooling", core="cosine")


def test_unknown_keywords_are_errors_that_list_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown keyword argument 'banana' for model 'alternet50_cifar'; valid keys:"):
        vitlab.create_model("alternet50_cifar", banana=1)
    with pytest.raises(ValueError, match=r"'tua' \(did you mean 'tau'\?\).*valid keys: .*tau"):
        vitlab.create_model("vit_tiny_patch4_32", mixer="cosine", mixer_kwargs={"tua": 5})
    with pytest.raises(ValueError, match="'tau'.*valid keys: qk_norm, qkv_bias"):
        vitlab.create_model("vit_tiny_patch4_32", mixer_kwargs={"tau": 5})  # softmax takes no temperature
    with pytest.raises(ValueError, match="pool_size"):
        vitlab.create_model("vit_tiny_patch4_32", mixer="pooling", mixer_kwargs={"pool": 5})


def test_non_attention_mixer_in_swin_gets_no_attention_parameters():
    """Pooling in Swin: no relative-position tables (they would never receive a gradient)."""
    m = run_family("swin", mixer="pooling")
    assert not [n for n, _ in m.named_parameters() if "relative_position" in n or ".attn." in n]


def test_docs_parts_table_is_current():
    """docs/parts.md is what ``vitlab models --parts`` prints today (regenerate it when parts change)."""
    import pathlib

    from vitlab.models.parts_table import parts_markdown

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "parts.md"
    assert doc.read_text() == parts_markdown(), "docs/parts.md is stale: run `vitlab models --parts > docs/parts.md`"


@pytest.mark.parametrize("family, expect", [
    ("vit", {"blocks.0.attn": ((8, 8), 1)}),                               # global, class token
    ("swin", {"layers.0.blocks.0.attn": ((2, 2), 0)}),                     # a 2x2 window
    ("pvt", {"stages.0.blocks.0.attn": ((4, 4), 0), "stages.1.blocks.0.attn": ((4, 4), 1)}),  # reduced keys
    ("cswin", {"layers.2.blocks.0.attn": ((2, 2), 0)}),                    # last stage: one branch over the map
])
def test_attention_records_carry_the_layout_of_their_keys(family, expect):
    """Analysis never guesses a grid: each recorded map comes with the grid and prefix count of the keys."""
    from vitlab.layers import record_attention

    name, small, size = FAMILIES[family]
    model = vitlab.create_model(name, **small).eval()
    with record_attention(model) as rec, torch.no_grad():
        model(torch.randn(1, *size))
    maps, layouts = rec.last(), rec.last_layouts()
    for module, (grid, prefix) in expect.items():
        lay = layouts[module]
        assert (lay.grid, lay.num_prefix) == (grid, prefix), (module, lay)
        assert maps[module].shape[-1] == lay.num_tokens


def test_train_eval_and_analyze_normalise_cifar_alike():
    """One home for CIFAR-10's mean and std: the data pipeline, the model's pretrained_cfg (what eval and
    analyze read for a model without a checkpoint) and the constants agree exactly."""
    from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD
    from vitlab.data.datasets import dataset_info

    info = dataset_info("cifar10")
    cfg = vitlab.create_model("vit_tiny_patch4_32").default_cfg
    assert tuple(info["mean"]) == tuple(cfg["mean"]) == CIFAR10_MEAN
    assert tuple(info["std"]) == tuple(cfg["std"]) == CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def test_parallel_wiring_is_one_residual_over_both_branches():
    """ViT-22B's parallel block: x + ls1(attn(norm1 x)) + ls2(mlp(norm2 x)), both branches on the same x;
    forward_halves gives one 'block' entry for it; the Lipschitz rule is 1 + Lip(attn) + Lip(mlp)."""
    from vitlab.analysis.lipschitz import lipschitz_bound_report
    from vitlab.layers import TokenLayout

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch4_32", depth=2, embed_dim=32, num_heads=2, wiring="parallel",
                                branch_scale="layerscale", shortcut_init=0.5, mixer="cosine").eval()
    blk = model.blocks[0]
    x = torch.randn(2, 65, 32)
    lay = TokenLayout((8, 8), 1)
    want = x + blk.ls1(blk.attn(blk.norm1(x), lay)) + blk.ls2(blk.mlp(blk.norm2(x), lay))
    with torch.no_grad():
        torch.testing.assert_close(blk(x, lay), want)
        halves = model.forward_halves(torch.randn(1, 3, 32, 32))
    assert [h.kind for h in halves] == ["embed", "block", "block"]
    with torch.no_grad():
        serial = vitlab.create_model("vit_tiny_patch4_32", depth=2, embed_dim=32, num_heads=2)
        assert not torch.allclose(serial.blocks[0](x, lay), x + serial.blocks[0].ls1(
            serial.blocks[0].attn(serial.blocks[0].norm1(x), lay)) + serial.blocks[0].ls2(
            serial.blocks[0].mlp(serial.blocks[0].norm2(x), lay)))
    # the same weights wired pre (serial): halves 1 + La and 1 + Lm; parallel: 1 + La + Lm
    kw = dict(depth=1, embed_dim=32, num_heads=2, mixer="cosine", norm="center",
              mixer_kwargs=dict(normalize_v=True, eps=0.05))
    factors = {}
    for wiring in ("pre", "parallel"):
        torch.manual_seed(0)
        m = vitlab.create_model("vit_tiny_patch4_32", wiring=wiring, **kw).eval()
        rep = lipschitz_bound_report(m)
        assert rep["unbounded"] == [] and math.isfinite(rep["bound"])
        factors.update({d["name"]: d["bound"] for d in rep["factors"]})
        from vitlab.analysis.lipschitz import lipschitz_estimate
        assert 0 < lipschitz_estimate(m, torch.randn(2, 3, 32, 32), iters=5) <= rep["bound"]
    h1, h2 = factors["blocks.0 (attention half)"], factors["blocks.0 (MLP half)"]
    assert factors["blocks.0 (parallel block)"] == pytest.approx(h1 + h2 - 1, rel=1e-9)


# -- the user's attention position parts (attn_position) in every family ----------------------------------------------
# families whose attention cannot take RoPE, with the words of the one-line capability error (both parts named)
ROPE_REFUSED = {
    **{fam: ("grouping 'spatial_reduction'", "queries are not the keys") for fam in ("pvt", "pvt_v2", "twins")},
    "scalablevit": ("grouping 'scalable_reduction'", "queries are not the keys"),
    "levit": ("grouping 'subsample'", "queries are not the keys"),
    "cvt": ("projection 'conv'", "needs every query to be a key"),
    "xcit": ("core 'cross_covariance'", "attends over channels"),
}


def _rope_hosts(model):
    return [m for m in model.modules() if "rope" in [p.name for p in getattr(m, "positions", None) or []]]


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_through_attn_position_runs_in_every_family_or_is_refused(family):
    """``attn_position=("rope",)`` on any family: trains one step with a gradient for every parameter and changes
    the logits of the same (randomised) weights, or is refused naming rope and the part it cannot work with."""
    from parity import randomize_

    name, small, size = FAMILIES[family]
    model = run_or_refused(family, ROPE_REFUSED.get(family), "position bias 'rope'", attn_position=("rope",))
    if model is None:
        return
    assert _rope_hosts(model), f"{family}: no attention holds rope"
    plain = vitlab.create_model(name, **small)
    randomize_(model)
    plain.load_state_dict(model.state_dict())  # strict: rope adds no tensors
    x = torch.randn(2, *size)
    with torch.no_grad():
        a, b = model.eval()(x), plain.eval()(x)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert (a - b).abs().max() > 1e-3 * b.abs().max(), f"{family}: rope does not change the logits"


def test_every_family_that_takes_modifiers_takes_attn_position():
    """One keyword on every family: a model class with ``modifiers`` has ``attn_position`` too."""
    from vitlab.models.factory import MODELS, model_entrypoint
    from vitlab.registry import accepted_keys

    vitlab.list_models()
    missing = set()
    for name in MODELS.names():
        fn = model_entrypoint(name)
        keys = accepted_keys(getattr(fn, "model_cls", None) or fn) or []
        if "modifiers" in keys and "attn_position" not in keys:
            missing.add(getattr(getattr(fn, "model_cls", None), "__name__", name))
    assert not missing, f"take modifiers but not attn_position: {sorted(missing)}"


def test_attn_position_follows_the_family_position_parts_and_takes_part_options():
    name, small, size = FAMILIES["swin"]
    model = vitlab.create_model(name, **small, attn_position=("rope",), mixer_kwargs={"rope_theta": 50.0})
    hosts = _rope_hosts(model)
    assert len(hosts) == sum(small["depths"])
    for h in hosts:
        assert [p.name for p in h.positions] == ["relative", "rope"]  # Swin's table first, then the user's
        assert h.positions[1].theta == 50.0
    pair = vitlab.create_model(name, **small, attn_position=(("rope", {"rope_theta": 20.0}),))
    assert {h.positions[1].theta for h in _rope_hosts(pair)} == {20.0}
    # a linear-cost stage ('L') carries the user's position parts too, so rope is refused there, never dropped
    with pytest.raises(ValueError, match="position bias 'rope' cannot be combined with core 'focused_linear'"):
        vitlab.create_model(name, **small, attn_type="SL", attn_position=("rope",))


def test_attn_position_refusals_are_one_line():
    with pytest.raises(ValueError, match=r"mixer 'pooling' is not attention: .*attn_position=\('rope',\) do not apply"):
        vitlab.create_model("swin_tiny_patch4_window7_224", mixer="pooling", attn_position=("rope",))
    with pytest.raises(ValueError, match="ropee"):  # the registry's closest-name error
        vitlab.create_model("maxvit_tiny_tf_224", attn_position=("ropee",))
    with pytest.raises(ValueError, match="'rope_thta'.*valid keys"):
        vitlab.create_model("vit_tiny_patch4_32", depth=1, attn_position=("rope",), mixer_kwargs={"rope_thta": 5})
