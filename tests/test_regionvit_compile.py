"""RegionViT's padding masks travel with the call, not on the grouping ("RegionViT: Regional-to-Local Attention for
Vision Transformers", Chen, Panda & Fan, ICLR 2022, sec. 3.2; the official ``convert_to_flatten_layout`` masks).

The grouping builds the masks of a padded local map from the call's layout into the LSA branch (``Branch.keep``) and
``with_mask`` reads them from there, so one module gives the official logits whatever it (or another model) ran
before, a branch keeps its own masks while the grouping serves another call, and ``torch.compile`` traces the
masks as part of the call.  References: the official padding path written out in test_regionvit_padding.py."""
import copy

import pytest
import torch

from test_regionvit_padding import _official_mask, _pair, official_forward
from vitlab.layers import MultiHeadAttention, TokenLayout
from vitlab.layers.regional import MASKED, RegionalLayout, RegionalToLocal

pytestmark = pytest.mark.usefixtures("one_thread")


def _groupings(model):
    return [m.grouping for m in model.modules() if isinstance(getattr(m, "grouping", None), RegionalToLocal)]


def test_one_module_gives_the_official_logits_padded_unpadded_and_padded_again():
    torch.manual_seed(0)
    ref_a, a = _pair("3conv", 2)
    ref_b, b = _pair("3conv", 3)  # a second model, no state shared, with other paddings (window 3)
    before = [dict(vars(g)) for g in _groupings(a)]
    pad_a, fit_a, pad_b = torch.randn(2, 3, 44, 44), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want_pad, want_fit = official_forward(ref_a, pad_a, 2)[0], ref_a(fit_a)
        want_b = official_forward(ref_b, pad_b, 3)[0]
        first = a(pad_a)
        got_b = b(pad_b)
        got_fit = a(fit_a)  # 8 x 8 local map of 4 x 4 regions: nothing padded
        got_b2 = b(pad_b)
        again = a(pad_a)
    assert want_pad.std() > 0.1 and float((first - want_pad).abs().max()) < 1e-4
    assert float((got_fit - want_fit).abs().max()) < 1e-4
    assert float((got_b - want_b).abs().max()) < 1e-4 and torch.equal(got_b, got_b2)
    assert torch.equal(first, again)
    assert [dict(vars(g)) for g in _groupings(a)] == before  # the calls left nothing on the groupings
    assert _groupings(a) and not any(hasattr(g, "padding") for g in _groupings(a) + _groupings(b))


def test_a_branch_keeps_its_masks_while_the_grouping_serves_another_call():
    """Re-entrancy: a padded call's branch, masked after the same grouping has built an unpadded call, still carries
    the official masks (added as ``MASKED`` logits over its ``B * R`` groups), and the unpadded branch carries none."""
    window, regions, pad, batch = 2, (2, 3), (1, 1), 2
    padded = RegionalLayout((4, 6), 6, pad=pad)
    attn = MultiHeadAttention(8, 2, grouping=("regional", dict(window_size=window)), layout=padded)
    g = attn.grouping

    def branch(layout):
        x = torch.randn(batch, layout.num_tokens, 8)
        xq, _, state = g.inputs(attn, x, layout)
        q = torch.randn(xq.shape[0], 2, xq.shape[1], 4)
        return g.branches(attn, q, q, q, layout, state)[0]

    first = branch(padded)
    second = branch(TokenLayout((4, 6), 6))
    bias = torch.randn(1, 2, 5, 5)
    got = g.with_mask(attn, bias, first)
    want = bias + (1 - _official_mask(batch, *regions, window, pad[1], pad[0]))[:, None] * MASKED
    assert got.shape == (batch * 6, 2, 5, 5) and torch.equal(got, want)
    assert second.keep is None and g.with_mask(attn, bias, second) is bias
    assert not hasattr(g, "padding")


def test_compiled_padded_model_equals_eager():
    torch.manual_seed(1)
    ref, model = _pair("3conv", 2)
    x = torch.randn(2, 3, 36, 36)  # local maps 9 / 5 / 3 on regions of 2: padded in every stage
    fit = torch.randn(2, 3, 32, 32)
    # fullgraph: no graph break; static shapes, as dynamic ones through the padding arithmetic trace for minutes
    compiled = torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        want, want_fit, official = model(x), model(fit), official_forward(ref, x, 2)[0]
    # with grad on: under no_grad vitlab.layers.linear's oneDNN eligibility check breaks the graph before it asks
    # torch.compiler.is_compiling() (a break outside the masks)
    got = compiled(x).detach()
    got_fit = compiled(fit).detach()  # an unpadded input through the same compiled module, then the padded one again
    again = compiled(x).detach()
    assert float((want - official).abs().max()) < 1e-4
    assert float((got - want).abs().max()) < 1e-5 and float((again - want).abs().max()) < 1e-5
    assert float((got_fit - want_fit).abs().max()) < 1e-5
    assert _groupings(compiled) and not any(hasattr(g, "padding") for g in _groupings(compiled))
