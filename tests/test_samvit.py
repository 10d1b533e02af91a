"""SAM's image encoder ("Segment Anything", Kirillov et al., ICCV 2023; ViTDet's backbone, Li et al., ECCV 2022) and
the ``decomposed_relative`` position part (MViTv2, Li et al., CVPR 2022, sec. 4.1).

Checked against timm's ``samvit_*`` (randomised weights, relative tables included; both directions; intermediates
with and without the neck; parameter counts of every registered name), the decomposed bias against a loop over
query/key pairs (2-D and 3-D grids, prefix tokens, fused and explicit attention) and against timm's interpolating
``get_rel_pos``, the window padding against timm's ``window_partition`` / ``window_unpartition``, per-window biases
under the shift and padding masks against loops, and the part in every family (or refused with one clear error).
"""
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import vision_transformer_sam as tsam

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout
from vitlab.layers.decomposed_position import decomposed_bias, relative_embeddings
from vitlab.layers.grouping import Branch
from vitlab.layers.regional import MASKED, RegionalToLocal
from vitlab.models.parts_table import FAMILY_EXAMPLES
from parity import check_parity, meta_count, on_meta, randomize_, timm_pair
from test_parts_matrix import run_or_refused

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 px, patch 8: an 8x8 map in windows of 3 (padded to 9x9); blocks 1 and 3 global
SMALL = dict(img_size=64, patch_size=8, depth=4, window_size=3, global_attn_indexes=(1, 3), embed_dim=32,
             num_heads=2, num_classes=10)
NAMES = ["samvit_base_patch16", "samvit_large_patch16", "samvit_huge_patch16", "samvit_base_patch16_224"]


def brute_bias(q, tables, grid):
    """``q_i . sum_a R^a[i_a - j_a + s_a - 1]`` for every query/key pair of ``grid`` (raster order), by loops."""
    coords = list(itertools.product(*[range(s) for s in grid]))
    out = torch.zeros(*q.shape[:2], len(coords), len(coords), dtype=q.dtype)
    for i, ci in enumerate(coords):
        for j, cj in enumerate(coords):
            r = sum(t[ci[a] - cj[a] + grid[a] - 1] for a, t in enumerate(tables))
            out[:, :, i, j] = q[:, :, i] @ r
    return out


# -- timm parity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,over", [("samvit_base_patch16", dict(neck_chans=16)),
                                       ("samvit_base_patch16_224", {})])
def test_timm_parity_both_directions(name, over):
    rep = check_parity(name, **SMALL, **over)
    assert rep.worst() < 1e-4 and len(rep.intermediates) == 5  # forward_features + the 4 blocks
    ref, ours = timm_pair(name, **SMALL, **over)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for norm in (False, True):  # norm: the neck on every tap, as timm
            want = ref.forward_intermediates(x, norm=norm, intermediates_only=True)
            got = ours.forward_intermediates(x, norm=norm, intermediates_only=True)
            assert max(float((a - b).abs().max()) for a, b in zip(want, got)) < 1e-4
        assert ours.blocks[0].attn.rel_pos_h.shape == (5, 16) and ours.blocks[1].attn.rel_pos_h.shape == (15, 16)
        before = ours(x)
        for blk in ours.blocks:  # the randomised tables reach the logits
            blk.attn.rel_pos_h.zero_(), blk.attn.rel_pos_w.zero_()
        assert (ours(x) - before).abs().max() > 1e-2 * before.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_timms(name):
    assert meta_count(vitlab.create_model, name) == meta_count(timm.create_model, name)


def test_recipes_follow_timm():
    m = on_meta(vitlab.create_model, "samvit_base_patch16")
    assert m.num_classes == 0 and m.num_features == 256 and m.pos_embed.shape == (1, 64 * 64, 768)
    assert [i for i, b in enumerate(m.blocks) if b.attn.grouping.name == "global"] == [2, 5, 8, 11]
    assert m.blocks[0].attn.rel_pos_h.shape == (27, 64) and m.blocks[2].attn.rel_pos_w.shape == (127, 64)
    small = vitlab.create_model("samvit_base_patch16", img_size=64, depth=3, global_attn_indexes=(-1,),
                                embed_dim=32, num_heads=2)
    assert [b.attn.grouping.name for b in small.blocks] == ["window", "window", "global"]
    assert small.blocks[0].attn.grouping.window == (14, 14)  # a 4x4 map padded to one whole window, as timm
    assert small(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    m224 = on_meta(vitlab.create_model, "samvit_base_patch16_224")
    assert m224.pos_embed is None and m224.num_features == 768 and m224.num_classes == 1000
    for name in NAMES:
        cfg, ref = on_meta(vitlab.create_model, name).default_cfg, timm.get_pretrained_cfg(name).to_dict()
        assert all(cfg[k] == ref[k] for k in ("input_size", "crop_pct", "mean", "std", "num_classes",
                                              "fixed_input_size", "interpolation")), name


# -- the decomposed part -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(3, 4), (2, 2, 3)])
def test_decomposed_bias_equals_a_loop_over_pairs(grid):
    q = torch.randn(2, 3, torch.Size(grid).numel(), 5, dtype=torch.float64)
    tables = [torch.randn(2 * s - 1, 5, dtype=torch.float64) for s in grid]
    torch.testing.assert_close(decomposed_bias(q, tables, grid), brute_bias(q, tables, grid))


@pytest.mark.parametrize("q_size,k_size,rows", [(4, 4, 7), (4, 4, 5), (3, 6, 11), (6, 3, 9), (5, 5, 13)])
def test_relative_embeddings_interpolate_as_timm(q_size, k_size, rows):
    table = torch.randn(rows, 4)
    torch.testing.assert_close(relative_embeddings(q_size, k_size, table), tsam.get_rel_pos(q_size, k_size, table))
    grid = (q_size, q_size + 1)
    th, tw = torch.randn(rows, 4), torch.randn(rows + 2, 4)
    q = torch.randn(2, 1, grid[0] * grid[1], 4)
    torch.testing.assert_close(decomposed_bias(q, [th, tw], grid)[:, 0],
                               tsam.get_decomposed_rel_pos_bias(q[:, 0], th, tw, grid, grid))


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "fused"])
def test_attention_with_a_class_token_equals_the_formula(explicit, monkeypatch):
    """Prefix tokens get no term; the term uses the unscaled query and is added after the scaling."""
    import vitlab.layers.mha as mha

    monkeypatch.setattr(mha, "EXPLICIT_BIAS_LOGITS", 10 ** 9 if explicit else 0)
    attn = MultiHeadAttention(16, 2, position=("decomposed_relative",), layout=TokenLayout((3, 4), 1)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(), attn.rel_pos_w.normal_()
        x = torch.randn(2, 13, 16)
        q, k, v = attn.qkv(x).reshape(2, 13, 3, 2, 8).permute(2, 0, 3, 1, 4)
        bias = F.pad(brute_bias(q[:, :, 1:], [attn.rel_pos_h, attn.rel_pos_w], (3, 4)), (1, 0, 1, 0))
        probs = (q @ k.transpose(-2, -1) * 8 ** -0.5 + bias).softmax(-1)
        want = attn.proj((probs @ v).transpose(1, 2).reshape(2, 13, 16))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


# -- windows: padding as timm, masks with a bias per window --------------------------------------------------
@pytest.mark.parametrize("hw,window", [((8, 7), 3), ((4, 4), 14)])
def test_window_padding_equals_timms_partition(hw, window):
    attn = MultiHeadAttention(8, 2, grouping=("window", dict(window_size=window, fit_map=False)),
                              layout=TokenLayout(hw))
    x = torch.randn(2, hw[0] * hw[1], 8)
    windows, _, state = attn.grouping.inputs(attn, x, TokenLayout(hw))
    want, pad_hw = tsam.window_partition(x.view(2, *hw, 8), window)
    assert torch.equal(windows, want.flatten(1, 2))
    back = attn.grouping.outputs(attn, windows, state)
    assert torch.equal(back, tsam.window_unpartition(want, window, hw, pad_hw).flatten(1, 2)) and torch.equal(back, x)


def test_a_bias_per_window_gets_each_windows_mask():
    """Swin's shift mask and RegionViT's padding masks add to a bias that differs per window (rows = B x groups)."""
    attn = MultiHeadAttention(8, 2, grouping=("window", dict(window_size=2, shift=True)), layout=TokenLayout((4, 4)))
    mask, rows = attn.attn_mask, 2 * 4
    bias = torch.randn(rows, 2, 4, 4)
    branch = Branch(torch.zeros(rows, 2, 4, 1), None, None, slice(0, 2), (2, 2))
    want = torch.stack([bias[r] + mask[r % 4] for r in range(rows)])
    torch.testing.assert_close(attn.grouping.with_mask(attn, bias, branch), want)
    keep = torch.rand(3, 5, 5) > 0.3  # 3 regions of 1 + 2x2 tokens, 2 images
    branch = Branch(torch.zeros(6, 2, 5, 1), None, None, slice(0, 2), (2, 2), 1, keep=keep)
    bias = torch.randn(6, 2, 5, 5)
    want = torch.stack([bias[r] + torch.where(keep[r % 3], 0.0, MASKED) for r in range(6)])
    torch.testing.assert_close(RegionalToLocal(2).with_mask(None, bias, branch), want)


# -- the part in every family --------------------------------------------------------------------------------
REFUSED = {
    "cswin": ("grouping 'stripes'", "groups of one grid"),
    **{f: ("spatial_reduction", "queries are not the keys") for f in ("pvt", "pvt_v2", "twins")},
    "scalablevit": ("scalable_reduction", "queries are not the keys"),
    "levit": ("subsample", "queries are not the keys"),
    "cvt": ("projection 'conv'", "needs every query to be a key"),
    "xcit": ("cross_covariance", "no additive logit bias"),
    "navit": ("token grid",),
    "samvit": ("already on this attention",),
}


@pytest.mark.parametrize("family", list(FAMILY_EXAMPLES))
def test_decomposed_relative_in_every_family_runs_or_is_refused(family):
    size = FAMILY_EXAMPLES[family][2]
    model = run_or_refused(family, REFUSED.get(family), "decomposed_relative", attn_position=("decomposed_relative",))
    if model is None:
        return
    model = randomize_(model)  # zero-init norms (Swin V2)
    model.zero_grad()
    out = model(torch.randn(2, *size))
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    tables = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("rel_pos_")]
    # (a class-token model's last tables get a zero gradient: the pooled class token reads no term)
    assert tables and any(float(p.grad.abs().max()) > 0 for p in tables), family


# -- arguments -----------------------------------------------------------------------------------------------
def test_bad_arguments_are_one_line_errors():
    kw = dict(img_size=64, depth=4, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"global_attn_indexes \[1, 4\] must index blocks of depth 4"):
        vitlab.create_model("samvit_base_patch16", **kw, global_attn_indexes=(1, 4))
    with pytest.raises(ValueError, match="window_size must be an int >= 0"):
        vitlab.create_model("samvit_base_patch16", **kw, window_size=-1)
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        vitlab.create_model("samvit_base_patch16", **kw, global_pool="token")
    with pytest.raises(ValueError, match="dynamic_img_size"):
        vitlab.create_model("samvit_base_patch16", **kw, dynamic_img_size=True)
    with pytest.raises(ValueError, match="'decomposed_relative'.*grouping 'class_query'.*queries are not the keys"):
        MultiHeadAttention(16, 2, grouping="class_query", position=("decomposed_relative",),
                           layout=TokenLayout((3, 3), 1))
    attn = MultiHeadAttention(16, 2, position=("decomposed_relative",), layout=TokenLayout((3, 3)))
    with pytest.raises(ValueError, match=r"built for 2-D groups \(3, 3\); got groups of grid \(2, 2, 2\)"):
        attn(torch.randn(1, 8, 16), TokenLayout((2, 2, 2)))


def test_pruning_drops_the_neck_and_its_head_as_timm():
    ref, ours = timm_pair("samvit_base_patch16", **SMALL, neck_chans=16)
    for m in (ref, ours):
        assert m.prune_intermediate_layers(indices=[2], prune_norm=True) == [2]
    assert len(ours.blocks) == 3 and ours.num_features == 32 and isinstance(ours.head, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x))  # the last block's map
        assert ours(x).shape == (2, 32)  # vitlab's classifier-free forward pools (timm's returns the map)
        torch.testing.assert_close(ours.forward_intermediates(x, indices=[2], norm=True)[1],
                                   ref.forward_intermediates(x, indices=[2], norm=True)[1])
