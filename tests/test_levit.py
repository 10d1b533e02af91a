"""LeViT ("LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", Graham et al., ICCV 2021): timm
parity for every size (linear and 1x1-conv layouts; timm's stride-8, wider and deeper SiLU experiments too), parameter
counts vs timm and the paper, the offset bias and the
subsampling attention against loops and einsum, the token BatchNorm, the distilled head, the contract, the parts
every family takes, and vit-pytorch's class."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.layers.linear_norm import LinearNorm, TokenBatchNorm
from vitlab.layers.offset_bias import offset_index

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = ("128s", "128", "192", "256", "384")
NAMES = [f"levit_{s}" for s in SIZES] + [f"levit_conv_{s}" for s in SIZES]
EXPERIMENTS = ("384_s8", "512_s8", "512", "256d", "512d")  # timm's untrained stride-8 / wider / deeper models
NEW_NAMES = [f"levit_{s}" for s in EXPERIMENTS] + [f"levit_conv_{s}" for s in EXPERIMENTS]
# a 2x2 -> 1x1 map (32 px, stride 16), two stages
SMALL = dict(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), num_classes=10)


def _small(name="levit_128s", **kw):
    return vitlab.create_model(name, **{**SMALL, **kw})


def _randomize_bn_(model):
    from parity import randomize_

    return randomize_(model, seed=3).eval()


# -- timm: parity, counts, intermediates ---------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_timm_parity_every_size(name):
    from parity import check_parity

    # every parameter and BatchNorm statistic randomised; logits, stage maps and the state dict back to timm
    rep = check_parity(name, img_size=64, depth=(1, 1, 1))
    assert len(rep.intermediates) == 4 and not rep.notes  # forward_features + the 3 stage maps compared


# the smallest of each kind of experiment, both layouts; 256d keeps a deeper middle stage
@pytest.mark.parametrize("name,depth", [(n, (1, 2, 1) if n.endswith("d") else (1, 1, 1)) for n in NEW_NAMES
                                        if n.endswith(("384_s8", "_512", "256d"))])
def test_timm_parity_experiments(name, depth):
    from parity import check_parity

    rep = check_parity(name, img_size=64, depth=depth)
    assert len(rep.intermediates) == 4 and not rep.notes


def test_every_timm_levit_name_is_registered():
    assert sorted(NAMES + NEW_NAMES) == vitlab.list_models("levit_*") == timm.list_models("levit_*")


@pytest.mark.parametrize("name", NAMES + NEW_NAMES)
def test_param_counts_equal_timm(name):
    with torch.device("meta"):
        ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
        ref = sum(p.numel() for p in timm.create_model(name).parameters())
    assert ours == ref


@pytest.mark.parametrize("size,millions", [("128s", 7.8), ("128", 9.2), ("192", 11.0), ("256", 18.9), ("384", 39.1)])
def test_param_counts_match_the_paper(size, millions):
    # the paper's model table (Graham et al., ICCV 2021; with the distillation head), in millions to one decimal
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(f"levit_{size}").parameters())
    assert abs(n / 1e6 - millions) < 0.06


@torch.no_grad()
def test_forward_intermediates_features_and_info_equal_timm():
    from parity import timm_pair

    ref, ours = timm_pair("levit_192", img_size=64, depth=(1, 2, 1))
    x = torch.randn(2, 3, 64, 64)
    for kw in (dict(), dict(indices=[0, 2]), dict(indices=1, stop_early=True), dict(indices=[1], stop_early=True)):
        f_ours, i_ours = ours.forward_intermediates(x, **kw)
        f_ref, i_ref = ref.forward_intermediates(x, **kw)
        assert [t.shape for t in i_ours] == [t.shape for t in i_ref]
        for a, b in zip([f_ours] + i_ours, [f_ref] + i_ref):
            assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5, kw
    assert ours.forward_features(x).shape == (2, 1, 384)  # tokens of the last 1x1 map, as timm's
    assert ours.feature_info == ref.feature_info
    assert ours.group_matcher() == ref.group_matcher() and ours.group_matcher(True) == ref.group_matcher(True)
    pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert float((pre - ref.forward_head(ref.forward_features(x), pre_logits=True)).abs().max()) < 1e-5


@torch.no_grad()
def test_stride8_stem_and_activations_equal_timm():
    """levit_384_s8: three stem convs to a stride-8 map (28 x 28 at 224, so attention biases over 784 offsets), the
    stages at strides 8 / 16 / 32; SiLU wherever timm's experiments put it (stem, MLPs, before each attention's
    output projection) and no hard-swish left; ``attn_act_layer`` only changes the attention's."""
    from parity import timm_pair

    ref, ours = timm_pair("levit_384_s8", img_size=64, depth=(1, 1, 1))
    assert [n for n, _ in ours.stem.named_children()] == ["conv1", "act1", "conv2", "act2", "conv3"]
    x = torch.randn(2, 3, 64, 64)
    assert ours.forward_intermediates(x, intermediates_only=True)[0].shape == (2, 384, 8, 8)
    assert ours.feature_info == ref.feature_info and [f["reduction"] for f in ours.feature_info] == [8, 16, 32]
    with torch.device("meta"):
        full = vitlab.create_model("levit_384_s8")
    assert full.stages[0].blocks[0].attn.attention_biases.shape == (6, 28 * 28)

    def acts(model):
        return sorted(type(m).__name__ for m in model.modules() if isinstance(m, (nn.SiLU, nn.Hardswish)))

    assert acts(ours) == acts(ref) and set(acts(ours)) == {"SiLU"}
    kw = dict(img_size=64, depth=(1, 1, 1), attn_act_layer="hard_swish")
    ref, ours = timm_pair("levit_256d", **kw)
    assert torch.allclose(ours(x), ref(x), atol=1e-4)
    assert {type(m.proj.act) for m in ours.modules() if isinstance(m, MultiHeadAttention)} == {nn.Hardswish}
    assert acts(ours) == acts(ref)


@pytest.mark.parametrize("kw,words", [(dict(stem_type="s4"), ("stem_type", "'s4'", "'s16'")),
                                      (dict(act_layer="swish"), ("act_layer='swish'", "silu")),
                                      (dict(stem_type="s8", img_size=36), ("stride 8", "multiple of 8", "36"))])
def test_stem_and_activation_refusals(kw, words):
    with pytest.raises(ValueError) as err:
        _small(**kw)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_layer_decay_and_weight_decay_equal_timm():
    from timm.optim import create_optimizer_v2

    def lr_and_wd(model):
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"]) for g in opt.param_groups
                for p in g["params"]}

    kw = dict(img_size=64, depth=(1, 2, 1))
    got, want = lr_and_wd(vitlab.create_model("levit_128s", **kw)), lr_and_wd(timm.create_model("levit_128s", **kw))
    assert got == want and len({s for s, _ in want.values()}) > 4
    assert {n for n in want if "attention_biases" in n} <= vitlab.create_model("levit_128s", **kw).no_weight_decay()


# -- the new parts against independent computations ---------------------------------------------------------
@pytest.mark.parametrize("grid,stride", [((3, 4), 1), ((4, 4), 2), ((5, 3), 2), ((4, 6), 3)])
def test_offset_index_against_a_loop(grid, stride):
    h, w = grid
    queries = [(y, x) for y in range(0, h, stride) for x in range(0, w, stride)]
    keys = [(y, x) for y in range(h) for x in range(w)]
    want = torch.tensor([[abs(qy - ky) * w + abs(qx - kx) for ky, kx in keys] for qy, qx in queries])
    assert torch.equal(offset_index(grid, stride), want)


def _rand_bn_(module, g):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _bn_eval(bn, t):
    return (t - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 2])
def test_levit_attention_against_einsum(stride):
    """Projection ``linear_norm`` + grouping ``subsample`` + position ``offset`` equal LeViT's attention written out:
    per-head [q, k, v] channels, q from every ``stride``-th token, the bias table read in a loop, hard-swish,
    LinearNorm."""
    g = torch.Generator().manual_seed(0)
    h, w, dim, heads, d, dv, out = 4, 3, 12, 3, 4, 8, 10
    grouping = ("subsample", dict(query_stride=stride))
    attn = MultiHeadAttention(dim, heads, projection="linear_norm", grouping=grouping, position=("offset",),
                              head_dim=d, value_dim=dv, out_dim=out, layout=TokenLayout((h, w))).eval()
    _rand_bn_(attn, g)
    attn.attention_biases.copy_(torch.randn(heads, h * w, generator=g))
    x = torch.randn(2, h * w, dim, generator=g)
    xm = x.reshape(2, h, w, dim)[:, ::stride, ::stride].reshape(2, -1, dim)
    if stride == 1:  # one LinearNorm, [q, k, v] per head
        t = _bn_eval(attn.qkv.bn, x @ attn.qkv.linear.weight.T).reshape(2, h * w, heads, 2 * d + dv)
        q, k, v = t[..., :d], t[..., d:2 * d], t[..., 2 * d:]
    else:  # q from the subsampled tokens, [k, v] per head from all
        q = _bn_eval(attn.q.ln.bn, xm @ attn.q.ln.linear.weight.T).reshape(2, -1, heads, d)
        t = _bn_eval(attn.kv.bn, x @ attn.kv.linear.weight.T).reshape(2, h * w, heads, d + dv)
        k, v = t[..., :d], t[..., d:]
    qpos = [(y, c) for y in range(0, h, stride) for c in range(0, w, stride)]
    kpos = [(y, c) for y in range(h) for c in range(w)]
    table = attn.attention_biases
    bias = torch.stack([torch.stack([torch.stack([table[n, abs(a - y) * w + abs(b - c)] for y, c in kpos])
                                     for a, b in qpos]) for n in range(heads)])
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5 + bias
    o = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(2, len(qpos), heads * dv)
    want = _bn_eval(attn.proj.ln.bn, F.hardswish(o) @ attn.proj.ln.linear.weight.T)
    assert torch.allclose(attn(x), want, atol=1e-5)
    with record_attention(attn) as rec:  # the explicit path, recorded with its key map
        assert torch.allclose(attn(x), want, atol=1e-5)
    assert [tuple(m.shape) for m in rec.last().values()] == [(2, heads, len(qpos), h * w)]


def test_offset_bias_cache_follows_every_change_of_the_table():
    """Without autograd the gathered bias is cached (timm's eval cache); an in-place change, a new state dict or a
    training step must invalidate it, and a forward with gradients must never read it."""
    from parity import randomize_

    # maps 8x8, 4x4, 2x2; randomised, so the zero-initialised branch-closing norms let the biases matter
    m = randomize_(vitlab.create_model("levit_128s", img_size=128, num_classes=5), seed=1).eval()
    fresh = vitlab.create_model("levit_128s", img_size=128, num_classes=5).eval()
    x = torch.randn(2, 3, 128, 128)
    tables = [t for n, t in m.named_parameters() if n.endswith("attention_biases")]
    with torch.no_grad():
        m(x)  # fills the caches
        for t in tables:
            t.copy_(torch.randn_like(t))  # in place: same tensor, new version
        fresh.load_state_dict(m.state_dict())
        torch.testing.assert_close(m(x), fresh(x))
        changed = {k: torch.randn_like(v) if k.endswith("attention_biases") else v for k, v in m.state_dict().items()}
        m.load_state_dict(changed)
        fresh.load_state_dict(changed)
        torch.testing.assert_close(m(x), fresh(x))
    with torch.inference_mode():
        want = fresh(x)
        torch.testing.assert_close(m(x), want)
    loss = m(x).std()  # with autograd: the gather is recorded, the table gets its gradient
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables)
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), fresh(x))


def test_token_batchnorm_uses_every_token_of_the_batch():
    bn = TokenBatchNorm(6).train()
    x = torch.randn(3, 5, 6) * 2 + 1
    flat = x.reshape(-1, 6)
    want = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + bn.eps)
    assert torch.allclose(bn(x), want.reshape(3, 5, 6), atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * flat.mean(0), atol=1e-6)
    unit = LinearNorm(4, 6, norm_init=0.0)
    assert torch.equal(unit.bn.weight, torch.zeros(6)) and unit.linear.bias is None


# -- distillation, contract --------------------------------------------------------------------------------
def test_distilled_head_equals_timm_in_training_and_evaluation():
    from parity import timm_pair

    ref, ours = timm_pair("levit_128s", img_size=32, depth=(1, 1, 1))
    x = torch.randn(4, 3, 32, 32)
    for m in (ref, ours):
        m.set_distilled_training(True)
        m.train()
    torch.manual_seed(0)
    a, b = ours(x), ref(x)
    assert isinstance(a, tuple) and all(torch.allclose(s, t, atol=1e-5) for s, t in zip(a, b))
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours(x), (ours.head(ours.forward_head(ours.forward_features(x), True))
                                    + ours.head_dist(ours.forward_head(ours.forward_features(x), True))) / 2,
                          atol=1e-5)


def test_contract_record_reset_and_input_checks():
    model = _small().eval()
    x = torch.randn(2, 3, 32, 32)
    with record_attention(model) as rec:
        model(x)
    # two blocks (2x2 map: 4 x 4 logits) and the shrinking attention (1 query, 4 keys, 32 / 8 = 4 heads)
    assert sorted(tuple(m.shape) for m in rec.last().values()) == [(2, 2, 4, 4), (2, 3, 1, 1), (2, 4, 1, 4)]
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.pretrained_cfg["num_classes"] == 5
    assert all(h.linear.out_features == 5 and isinstance(h.bn, TokenBatchNorm) for h in model.get_classifier())
    model.reset_classifier(0)
    assert model(x).shape == (2, 48)
    with pytest.raises(ValueError, match="img_size=64"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 16"):
        _small(img_size=40)
    assert _small(distilled=False).get_classifier().linear.out_features == 10
    feats = vitlab.create_model("levit_128s", features_only=True, out_indices=(0,), **SMALL)
    assert [f.shape for f in feats(x)] == [(2, 32, 2, 2)]


# -- parts, as in every family -----------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [dict(mixer="cosine"), dict(core="cosine", modifiers=("talking_heads",)),
                                   dict(mixer="pooling"), dict(norm="layernorm"), dict(branch_scale="layerscale"),
                                   dict(featscale=True), dict(wiring="parallel"), dict(mlp="mlp"),
                                   dict(mixer="cosine", mixer_kwargs=dict(tau=12.0))],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_parts_train_with_a_gradient_for_every_parameter(parts):
    model = _small(**parts).train()
    out = model(torch.randn(2, 3, 32, 32))
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    if "norm" in parts:  # the norm of every LinearNorm and of the heads; the stem keeps BatchNorm2d
        assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    if parts.get("mixer") == "pooling":  # the blocks pool; the shrinking attention stays attention
        assert isinstance(model.stages[1].downsample.attn_downsample, MultiHeadAttention)
    if "tau" in parts.get("mixer_kwargs", {}):
        assert all(float(m.tau) == 12.0 for m in model.modules() if isinstance(m, MultiHeadAttention))


@pytest.mark.parametrize("parts,words", [
    (dict(wiring="post"), ("wiring='post'", "no norm outside their branches")),
    (dict(core="focused_linear"), ("focused_linear", "offset", "no additive logit bias")),
    (dict(modifiers=("lsa",)), ("lsa", "subsample", "no diagonal")),
    (dict(mixer_kwargs=dict(window_size=2)), ("window_size", "valid keys")),
])
def test_refusals_are_one_clear_error(parts, words):
    with pytest.raises(ValueError) as err:
        _small(**parts)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_value_width_refusals_in_the_attention():
    with pytest.raises(ValueError, match="projection 'linear' makes values as wide as the keys"):
        MultiHeadAttention(16, 2, head_dim=8, value_dim=16)
    with pytest.raises(ValueError, match="position bias 'lepe' needs values as wide as the keys"):
        MultiHeadAttention(16, 2, projection="linear_norm", position=("lepe",), head_dim=8, value_dim=16,
                           layout=TokenLayout((4, 4)))


# -- vit-pytorch's class -----------------------------------------------------------------------------------
def test_vit_pytorch_readme_example_runs_with_the_import_changed():
    from vit_pytorch.levit import LeViT as Theirs

    from vitlab.compat.vit_pytorch.levit import LeViT

    kw = dict(image_size=224, num_classes=1000, stages=3, dim=(256, 384, 512), depth=4, heads=(4, 6, 8), mlp_mult=2,
              dropout=0.1)
    levit = LeViT(**kw)
    img = torch.randn(1, 3, 224, 224)
    assert levit(img).shape == Theirs(**kw)(img).shape == (1, 1000)
    assert [len(s.blocks) for s in levit.stages] == [4, 4, 4] and levit.embed_dim == (256, 384, 512)
    assert levit.stages[0].blocks[0].attn.value_dim == 64 and levit.stages[0].blocks[0].attn.head_dim == 32


def test_vit_pytorch_arguments_mapped_or_refused():
    from vitlab.compat.vit_pytorch.levit import LeViT

    kw = dict(image_size=32, num_classes=10, dim=(32, 48), depth=1, heads=2, mlp_mult=2, stages=2, dim_key=8,
              dim_value=24)
    model = LeViT(**kw, num_distill_classes=10).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 10), (2, 10)]  # vit-pytorch's pair
    assert model.stages[1].blocks[0].attn.num_heads == 2 and model.stages[0].blocks[0].attn.value_dim == 24
    with pytest.raises(ValueError, match="num_distill_classes=5"):
        LeViT(**kw, num_distill_classes=5)
    with pytest.raises(ValueError, match="dim=.*stages=2"):
        LeViT(**{**kw, "dim": (32, 48, 64)})
