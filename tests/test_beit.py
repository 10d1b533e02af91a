"""BEiT / BEiT v2 (timm's ``beit_*`` / ``beitv2_*``) and the position part ``beit_relative``: the table index against
a loop over token pairs (and timm's), timm parity both ways with every parameter randomised, exact keys, shapes and
counts of every registered name on ``meta``, attention maps recomputed by hand, the family's rules for other
mixers, the part in every other family (run or refused), and checkpoints of another image size."""
import itertools
import math

import pytest
import torch

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.beit_position import beit_relative_index, beit_table_rows
from vitlab.models.parts_table import FAMILY_EXAMPLES
from parity import check_parity, on_meta, randomize_

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["beit_base_patch16_224", "beit_base_patch16_384", "beit_large_patch16_224", "beit_large_patch16_384",
         "beit_large_patch16_512", "beitv2_base_patch16_224", "beitv2_large_patch16_224"]
SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10)


def _brute_row(grid, p, i, j):
    """The table row of query ``i`` and key ``j`` (``p`` prefix tokens, then the grid in raster order), written out
    from BEiT's description: grid offsets ``(dy, dx, ...)`` shifted to >= 0 and read in mixed radix ``2g - 1``; the
    last three rows for class->patch, patch->class, class->class."""
    rows = math.prod(2 * g - 1 for g in grid) + 3
    if i < p and j < p:
        return rows - 1
    if i < p:
        return rows - 3
    if j < p:
        return rows - 2
    points = list(itertools.product(*map(range, grid)))
    row = 0
    for a, g in enumerate(grid):
        row = row * (2 * g - 1) + (points[i - p][a] - points[j - p][a] + g - 1)
    return row


@pytest.mark.parametrize("grid, p", [((3, 5), 1), ((4, 4), 1), ((2, 3), 2), ((2, 3, 4), 1)])
def test_relative_index_equals_a_loop_over_token_pairs(grid, p):
    index = beit_relative_index(grid, p)
    n = p + math.prod(grid)
    want = torch.tensor([[_brute_row(grid, p, i, j) for j in range(n)] for i in range(n)])
    assert torch.equal(index, want)
    assert int(index.max()) == beit_table_rows(grid) - 1 and set(index.flatten().tolist()) == set(
        range(beit_table_rows(grid)))  # every row of the table is used
    if len(grid) == 2 and p == 1:  # and timm's index
        from timm.models.beit import gen_relative_position_index
        assert torch.equal(index, gen_relative_position_index(grid))


@pytest.mark.parametrize("name, kw", [
    ("beit_base_patch16_224", dict(SMALL)),
    ("beitv2_base_patch16_224", dict(img_size=(24, 40), patch_size=8, depth=3, embed_dim=48, num_heads=4,
                                     num_classes=7)),  # a 3x5 grid: rows and columns not interchangeable
])
def test_timm_parity_both_ways(name, kw):
    x = torch.randn(2, 3, *((kw["img_size"],) * 2 if isinstance(kw["img_size"], int) else kw["img_size"]))
    rep = check_parity(name, x=x, **kw)
    assert rep.worst() < 1e-4 and len(rep.intermediates) == 1 + kw["depth"]


@pytest.mark.parametrize("name", NAMES)
def test_every_timm_name_has_timm_keys_shapes_and_count(name):
    ours, ref = on_meta(vitlab.create_model, name), on_meta(timm.create_model, name)
    from vitlab.interop import to_timm_state_dict

    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in to_timm_state_dict(ours).items()} == want
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    cfg, tcfg = ours.default_cfg, ref.pretrained_cfg
    assert all(cfg[k] == tuple(tcfg[k]) if isinstance(tcfg[k], (tuple, list)) else cfg[k] == tcfg[k]
               for k in ("input_size", "mean", "std", "crop_pct", "fixed_input_size")), (cfg, tcfg)


def test_the_registered_names_are_timms():
    assert vitlab.list_models("beit*") == sorted(n for n in timm.list_models("beit*") if not n.startswith("beit3"))


def test_recorded_attention_is_softmax_of_scaled_logits_plus_the_table_by_hand():
    torch.manual_seed(0)
    model = randomize_(vitlab.create_model("beit_base_patch16_224", **SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    with record_attention(model) as rec, torch.no_grad():
        model(x)
        attn = model.blocks[0].attn
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1)
        t = model.blocks[0].norm1(tokens)
        q = t @ attn.qkv.weight[:32].T + attn.q_bias  # q and v biases, no k bias
        k = t @ attn.qkv.weight[32:64].T
        q, k = (z.view(2, 17, 2, 16).transpose(1, 2) for z in (q, k))
        table = attn.relative_position_bias_table
        bias = torch.stack([torch.stack([table[_brute_row((4, 4), 1, i, j)] for j in range(17)]) for i in range(17)])
        want = (q @ k.transpose(-1, -2) / 4.0 + bias.permute(2, 0, 1)).softmax(-1)
    got = rec.last()["blocks.0.attn"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    lay = rec.last_layouts()["blocks.0.attn"]
    assert (lay.grid, lay.num_prefix) == ((4, 4), 1)
    assert table.abs().max() > 0.1  # the table was randomised: a bias of zero would not be tested


def test_the_family_adds_its_parts_to_any_mixer_as_swin_does():
    heads = lambda m: [mod for mod in m.modules() if isinstance(mod, MultiHeadAttention)]  # noqa: E731
    small = dict(SMALL)
    plain = heads(vitlab.create_model("beit_base_patch16_224", **small))
    assert all(h.part_names["position"] == ("beit_relative",) and h.part_names["projection"] == "linear_qv_bias"
               for h in plain)
    both = heads(vitlab.create_model("beit_base_patch16_224", **small, attn_position=("rope",)))
    assert all(h.part_names["position"] == ("beit_relative", "rope") for h in both)  # the family's first
    cos = heads(vitlab.create_model("beit_base_patch16_224", **small, mixer="cosine", mixer_kwargs={"tau": 5.0}))
    assert all(h.part_names["projection"] == "linear_qv_bias" and h.core.name == "cosine" for h in cos)
    linear = heads(vitlab.create_model("beit_base_patch16_224", **small, core="focused_linear"))
    assert all(h.part_names["position"] == () for h in linear)  # FLatten's rule: no logits, no table
    pooled = vitlab.create_model("beit_base_patch16_224", **small, mixer="pooling")
    assert not heads(pooled) and not [n for n, _ in pooled.named_parameters() if "relative_position" in n]
    sep = heads(vitlab.create_model("beit_base_patch16_224", **small, mixer_kwargs={"projection": "linear"}))
    assert all(h.part_names["projection"] == "linear" and h.qkv.bias is not None for h in sep)


# families that take BEiT's table (global attention with class tokens); every other one refuses it, naming it
ACCEPTS = {"vit", "deit_distilled", "t2t", "video", "pit", "crossvit", "beit"}
REFUSAL_WORDS = {
    **{f: ("grouping 'spatial_reduction'", "queries are not the keys") for f in ("pvt", "pvt_v2")},
    **{f: ("grouping 'window'", "not over the whole") for f in ("swin", "swinv2", "twins", "nest", "crossformer",
                                                                "scalablevit", "maxvit", "alternet")},
    **{f: ("needs a class (prefix) token",) for f in ("cait", "cct", "levit", "lookupvit")},
    "cswin": ("grouping 'stripes'", "groups of one grid"), "xcit": ("core 'cross_covariance'", "no additive logit"),
    "navit": ("fixed token grid",), "cvt": ("projection 'conv'", "every query to be a key"),
    "mobilevit": ("grouping 'unfold'", "not over the whole"), "sepvit": ("grouping 'separable'", "not over the whole"),
    "regionvit": ("grouping 'regional'", "not over the whole"),
}


@pytest.mark.parametrize("family", list(FAMILY_EXAMPLES))
def test_beit_relative_in_every_family_runs_or_is_refused(family):
    """``attn_position=("beit_relative",)``: where it runs, a gradient reaches every table and a randomised table
    changes the logits; elsewhere one error naming the part and why."""
    name, small, size = FAMILY_EXAMPLES[family]
    if family not in ACCEPTS:  # a family added later and listed in neither: a refusal must still name the part
        try:
            vitlab.create_model(name, **small, attn_position=("beit_relative",))
        except ValueError as err:
            assert "'beit_relative'" in str(err) and all(w in str(err) for w in REFUSAL_WORDS.get(family, ())), err
            return
        assert family not in REFUSAL_WORDS, f"{family} should refuse beit_relative"
    torch.manual_seed(0)
    model = vitlab.create_model(name, **small, attn_position=() if family == "beit" else ("beit_relative",))
    x = torch.randn(2, *size)
    out = model.train()(x)
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    tables = [(n, p) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and all(p.grad is not None and p.grad.abs().max() > 0 for _, p in tables), family
    assert all(p.grad is not None for p in model.parameters()), family
    randomize_(model).eval()
    with torch.no_grad():
        for _, p in tables:
            p.zero_()
        before = model(x)
        for _, p in tables:
            p.normal_(0.0, 1.0)
        after = model(x)
    before, after = (before[0], after[0]) if isinstance(before, tuple) else (before, after)
    assert (before - after).abs().max() > 1e-2 * before.abs().max(), f"{family}: the table does not reach the logits"


def test_grid_checks_at_forward_and_build():
    attn = MultiHeadAttention(16, 2, position=("beit_relative",), layout=TokenLayout((3, 3), 1))
    assert attn.relative_position_bias_table.shape == (5 * 5 + 3, 2)
    attn(torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match=r"built for a \(3, 3\) grid with 1 prefix token.*got \(4, 4\) with 1"):
        attn(torch.randn(1, 17, 16), TokenLayout((4, 4), 1))
    with pytest.raises(ValueError, match="cannot join another relative table"):
        MultiHeadAttention(16, 2, position=("relative", "beit_relative"), layout=TokenLayout((3, 3), 1))
    with pytest.raises(ValueError, match="'beit_relative'.*grouping 'class_query'.*queries are not the keys"):
        MultiHeadAttention(16, 2, grouping="class_query", position=("beit_relative",), layout=TokenLayout((3, 3), 1))


def test_a_checkpoint_of_another_size_loads_as_timm_resizes_it():
    """The 224 -> 384 route at small sizes: a 4x4-grid checkpoint into a 6x6-grid model, its tables resized as
    timm's ``checkpoint_filter_fn`` does (grid rows interpolated, the three class rows kept)."""
    from timm.models.beit import checkpoint_filter_fn

    kw = dict(SMALL, img_size=48)
    small = randomize_(vitlab.create_model("beit_base_patch16_224", **SMALL))
    big, ref = vitlab.create_model("beit_base_patch16_224", **kw), timm.create_model("beit_base_patch16_224", **kw)
    big.load_state_dict(small.state_dict())
    from vitlab.interop import to_timm_state_dict

    want = checkpoint_filter_fn(to_timm_state_dict(small), ref)["blocks.1.attn.relative_position_bias_table"]
    got = big.blocks[1].attn.relative_position_bias_table
    assert got.shape == (11 * 11 + 3, 2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[-3:], small.blocks[1].attn.relative_position_bias_table[-3:])
