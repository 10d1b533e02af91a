"""timm's model contract on every vitlab family (issue 12, item 6).

``forward_intermediates`` / ``prune_intermediate_layers`` against timm, layer-wise lr decay and
weight decay through ``timm.optim.create_optimizer_v2``, gradient checkpointing, ``pretrained_cfg``
through ``timm.data.resolve_model_data_config``, ``reset_classifier`` and ``feature_info`` -- all
at small sizes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitlab
from parity import timm_pair

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_S = "vit_small_patch16_224"
SWIN_T = "swin_tiny_patch4_window7_224"
# the same small configurations in both libraries
VIT_KW = dict(img_size=32, depth=6, num_classes=10)
SWIN_KW = dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
               num_classes=10, drop_path_rate=0.0)

# one small model of every family (and the distilled DeiT); no stochastic parts
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32,
                                                                num_heads=2)),
    "cait": ("cait_xxs24_224", dict(img_size=32, patch_size=8, depth=2, depth_token_only=1, embed_dim=32,
                                    num_heads=2)),
    "swin": (SWIN_T, dict(img_size=32, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2), window_size=2,
                          drop_path_rate=0.0)),
    "cswin": ("cswin_tiny_224", dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2),
                                     split_size=(1, 1, 2, 2), drop_path_rate=0.0)),
    "pvt": ("pvt_tiny", dict(img_size=64, depths=(1, 2, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1))),
    "pvt_v2": ("pvt_v2_b0", dict(img_size=64, depths=(1, 2, 1, 1), embed_dims=(8, 16, 24, 32),
                                 num_heads=(1, 1, 1, 1))),
    "resnet": ("resnet50", dict(img_size=32, layers=(1, 2, 1, 1))),
    "preact_resnet": ("preact_resnet50_cifar", dict(img_size=16, layers=(1, 2, 1, 1))),
    "alternet": ("alternet50_cifar", dict(img_size=32, layers=(1, 2, 2, 2), msa_counts=(0, 1, 1, 1))),
    "cvt": ("cvt_13_224", dict(img_size=64, embed_dims=(16, 32, 48), depths=(1, 2, 1), num_heads=(1, 2, 3))),
    "maxvit": ("maxvit_tiny_tf_224", dict(img_size=32, embed_dim=(16, 16, 32, 32), depths=(1, 2, 1, 1), stem_width=8,
                                          head_hidden_size=32, dim_head=8, drop_path_rate=0.0)),
}


def _small(family: str) -> nn.Module:
    name, kw = FAMILIES[family]
    return vitlab.create_model(name, **kw)


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    c, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(1))


# -- forward_intermediates against timm ----------------------------------------------------------
@pytest.fixture(scope="module")
def vit_pair():
    return timm_pair(VIT_S, **VIT_KW)


@pytest.fixture(scope="module")
def swin_pair():
    return timm_pair(SWIN_T, **SWIN_KW)


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        assert float((x - y).abs().max()) <= tol


@torch.no_grad()
def test_vit_forward_intermediates_equal_timm(vit_pair):
    ref, ours = vit_pair
    x = _input(ours)
    for kw in (dict(indices=[2, 5]), dict(indices=[2, 5], norm=True), dict(indices=[-1, 1], output_fmt="NLC"),
               dict(indices=3), dict(indices=None, norm=True, output_fmt="NLC")):
        _close(ours.forward_intermediates(x, intermediates_only=True, **kw),
               ref.forward_intermediates(x, intermediates_only=True, **kw))
    # final features and stop_early (the final norm runs on the partial result, as timm's)
    for kw in (dict(indices=[2, 5]), dict(indices=[1, 2], stop_early=True, norm=True)):
        f_ours, i_ours = ours.forward_intermediates(x, **kw)
        f_ref, i_ref = ref.forward_intermediates(x, **kw)
        _close([f_ours] + i_ours, [f_ref] + i_ref)
    assert len(ours.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


@torch.no_grad()
def test_swin_forward_intermediates_equal_timm(swin_pair):
    """Swin's feature taps are its 4 stages (timm's rule), so ``indices=[2, 5]`` is out of range in
    both libraries; ``[1, 3]`` takes stages 2 and 4."""
    ref, ours = swin_pair
    x = _input(ours)
    for kw in (dict(indices=[1, 3]), dict(indices=[1, 3], norm=True), dict(indices=2), dict(indices=None, norm=True)):
        _close(ours.forward_intermediates(x, intermediates_only=True, **kw),
               ref.forward_intermediates(x, intermediates_only=True, **kw))
    nlc = ours.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NLC", intermediates_only=True)
    want = ref.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
    _close(nlc, [t.flatten(2).transpose(1, 2) for t in want])
    for kw in (dict(indices=[1, 3]), dict(indices=[0, 1], stop_early=True, norm=True)):
        f_ours, i_ours = ours.forward_intermediates(x, **kw)
        f_ref, i_ref = ref.forward_intermediates(x, **kw)
        _close([f_ours] + i_ours, [f_ref.flatten(1, 2)] + i_ref)  # vitlab's features are (B, L, C)
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[2, 5])
    with pytest.raises(ValueError, match="output_fmt"):
        ours.forward_intermediates(x, output_fmt="NHWC")


@torch.no_grad()
def test_prune_intermediate_layers():
    for family, keep in (("vit", [0]), ("swin", [0, 1]), ("pvt_v2", [1]), ("resnet", [0, 2])):
        model = _small(family).eval()
        x = _input(model)
        want = model.forward_intermediates(x, indices=keep, intermediates_only=True)
        n_params = sum(p.numel() for p in model.parameters())
        assert model.prune_intermediate_layers(keep) == keep
        assert sum(p.numel() for p in model.parameters()) < n_params, family
        _close(model.forward_intermediates(x, indices=keep, intermediates_only=True), want, 0)
        assert model.num_classes == 0 and model(x).shape == (2, model.num_features), family
        assert model.num_features == model.feature_info[keep[-1]]["num_chs"], family


# -- layer-wise lr decay and weight decay through timm's optimizer factory ------------------------
def _lr_and_wd(model: nn.Module, rename=lambda n: n):
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = (round(g["lr_scale"], 12), g["weight_decay"])
    assert len(out) == len(names)
    return out


# timm's PVTv2 and ResNet take no img_size: full-size models on 64x64 inputs
OTHER_TIMM = [("cait_s24_224", dict(img_size=32, depth=4)),
              ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=3)), ("pvt_v2_b0", {}), ("resnet50", {}),
              ("vit_small_patch16_18x2_224", dict(img_size=32, depth=3))]


@pytest.mark.parametrize("name,kw", OTHER_TIMM, ids=[n for n, _ in OTHER_TIMM])
@torch.no_grad()
def test_forward_intermediates_equal_timm_other_families(name, kw):
    ref, ours = timm_pair(name, **kw)
    x = _input(ours)[..., :64, :64]
    for k in (dict(), dict(indices=2, norm=True)):
        f_ours, i_ours = ours.forward_intermediates(x, **k)
        f_ref, i_ref = ref.forward_intermediates(x, **k)
        _close([f_ours] + i_ours, [f_ref] + i_ref)


@pytest.mark.parametrize("name,kw", [(VIT_S, VIT_KW), (SWIN_T, SWIN_KW)] + OTHER_TIMM,
                         ids=["vit_s16", "swin_t"] + [n for n, _ in OTHER_TIMM])
def test_layer_decay_and_weight_decay_equal_timm(name, kw):
    import timm

    from vitlab.interop import to_timm_state_dict

    ours = vitlab.create_model(name, **kw)
    ref = timm.create_model(name, pretrained=False, **kw)
    # vitlab -> timm parameter names (Swin's classifier: head -> head.fc)
    timm_keys = list(to_timm_state_dict(ours))
    own_keys = list(ours.state_dict())
    rename = dict(zip(own_keys, timm_keys)).get
    got, want = _lr_and_wd(ours, rename), _lr_and_wd(ref)
    assert got.keys() == want.keys()
    diff = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not diff, f"lr scale / weight decay differ from timm's: {dict(list(diff.items())[:6])}"
    assert len({s for s, _ in want.values()}) > 4  # the test sees real layer-wise decay


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_decay_gives_only_the_head_the_full_lr(family):
    """No stage's downsampler or block gets the classifier's learning rate (the bug of grouping a
    hierarchical model's parts it does not know as the head)."""
    model = _small(family)
    scales = _lr_and_wd(model)
    top = max(s for s, _ in scales.values())
    full = {n for n, (s, _) in scales.items() if s == top}
    assert full and all(n.startswith(("head", "fc", "norm.")) for n in full), sorted(full)
    assert len({s for s, _ in scales.values()}) >= 4, family
    nwd = model.no_weight_decay()
    assert all(wd == (0.0 if n in nwd else 0.05) for n, (_, wd) in scales.items())


# -- gradient checkpointing -----------------------------------------------------------------------
def _block_modules(model: nn.Module):
    from vitlab.models.alternet import MSABlock
    from vitlab.models.block import Block
    from vitlab.models.resnet import Bottleneck, PreActBottleneck

    return [m for m in model.modules() if isinstance(m, (Block, Bottleneck, PreActBottleneck, MSABlock))]


def _grads_and_calls(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    calls = {"forward": 0, "backward": 0}
    phase = ["forward"]
    # a pre-hook: recomputation stops once every saved tensor is back (torch's early stop), before
    # a forward hook would run
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(phase[0], calls[phase[0]] + 1))
             for m in _block_modules(model)]
    try:
        loss = model(x).square().mean()
        phase[0] = "backward"
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grad_checkpointing_same_gradients_and_recomputes(family):
    model = _small(family).eval()  # eval: no dropout / drop path, BatchNorm on running statistics
    x = _input(model)
    plain, calls = _grads_and_calls(model, x)
    assert calls["forward"] > 0 and calls["backward"] == 0
    model.set_grad_checkpointing(True)
    ckpt, ccalls = _grads_and_calls(model, x)
    assert ccalls["backward"] == calls["forward"], f"{family}: blocks not recomputed in backward: {ccalls}"
    assert plain.keys() == ckpt.keys() and len(plain) == sum(1 for _ in model.parameters())
    worst = max(float((plain[n] - ckpt[n]).abs().max()) for n in plain)
    assert worst < 1e-6, f"{family}: gradients differ by {worst:.3g} with checkpointing"
    with torch.no_grad():  # no autograd: nothing to checkpoint, same outputs
        y = model(x)
        model.set_grad_checkpointing(False)
        assert torch.equal(y, model(x))


# -- pretrained_cfg, reset_classifier, feature_info ------------------------------------------------
@pytest.mark.parametrize("name,kw,size,mean", [
    ("vit_tiny_patch4_28", dict(depth=1), (1, 28, 28), "MNIST"),
    ("vit_tiny_patch4_32", dict(depth=1), (3, 32, 32), "CIFAR10"),
    ("resnet50_cifar", dict(layers=(1, 1, 1, 1)), (3, 32, 32), "CIFAR100"),
    (SWIN_T, dict(SWIN_KW), (3, 64, 64), "IMAGENET"),
    ("pvt_v2_b0", dict(img_size=96, depths=(1, 1, 1, 1)), (3, 96, 96), "IMAGENET"),
])
def test_resolve_model_data_config(name, kw, size, mean):
    from timm.data import resolve_model_data_config

    from vitlab import constants

    model = vitlab.create_model(name, **kw)
    cfg = resolve_model_data_config(model)
    assert cfg["input_size"] == size
    assert tuple(cfg["mean"]) == getattr(constants, f"{mean}_MEAN")
    assert tuple(cfg["std"]) == getattr(constants, f"{mean}_STD")
    assert cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]
    assert model.default_cfg is model.pretrained_cfg and model.pretrained_cfg["architecture"] == name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reset_classifier_and_feature_info(family):
    model = _small(family).eval()
    x = _input(model)
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
        info = model.feature_info
        assert [t.shape[1] for t in inter] == [d["num_chs"] for d in info]
        assert [x.shape[-1] // t.shape[-1] for t in inter] == [d["reduction"] for d in info]
        assert all(isinstance(model.get_submodule(d["module"]), nn.Module) for d in info)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
        heads = model.get_classifier()
        for h in heads if isinstance(heads, tuple) else (heads,):
            assert isinstance(h, nn.Linear) and h.out_features == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_reset_classifier_global_pool_vit():
    model = _small("vit").eval()
    x = _input(model)
    model.reset_classifier(4, global_pool="avg")
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model(x), model.head(feats[:, 1:].mean(1)), atol=1e-6)


# -- features_only (timm's feature extractor over the contract) ------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("which, indices", [("vit", (1, 3)), ("swin", (0, 2))])
def test_features_only_equals_timm(which, indices, vit_pair, swin_pair):
    import copy

    import timm

    from vitlab.models.factory import feature_extractor

    ref, ours = vit_pair if which == "vit" else swin_pair
    name, kw = (VIT_S, VIT_KW) if which == "vit" else (SWIN_T, SWIN_KW)
    feats = feature_extractor(copy.deepcopy(ours), out_indices=indices).eval()
    timm_feats = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices, **kw)
    assert feats.feature_info.channels() == timm_feats.feature_info.channels()
    assert feats.feature_info.reduction() == timm_feats.feature_info.reduction()
    x = _input(ours)
    _close(feats(x), ref.forward_intermediates(x, indices=list(indices), intermediates_only=True))
    # pruned after the last tap: the blocks / stages after it are gone
    assert len(feats.feature_info.module_name()) == len(indices)
    assert sum(p.numel() for p in feats.parameters()) < sum(p.numel() for p in ours.parameters())


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_features_only_every_family(family):
    name, kw = FAMILIES[family]
    full = vitlab.create_model(name, **kw).eval()
    n = len(full.feature_info)
    feats = vitlab.create_model(name, features_only=True, out_indices=(0, n - 2), **kw).eval()
    feats.load_state_dict({f"model.{k}": v for k, v in full.state_dict().items()
                           if f"model.{k}" in feats.state_dict()})
    x = _input(full)
    want = full.forward_intermediates(x, indices=[0, n - 2], intermediates_only=True)
    _close(feats(x), want)
    info = full.feature_info
    assert feats.feature_info.channels() == [info[0]["num_chs"], info[n - 2]["num_chs"]]
    assert feats.feature_info.reduction() == [info[0]["reduction"], info[n - 2]["reduction"]]
    with pytest.raises(ValueError, match="features_only"):
        vitlab.create_model(name, out_indices=(0,), **kw)


# -- dynamic_img_size and the token-level contract --------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", [VIT_S, "deit_tiny_distilled_patch16_224"])
def test_dynamic_img_size_equals_timm(name):
    ref, ours = timm_pair(name, img_size=64, depth=2, dynamic_img_size=True)
    for size in [(64, 64), (48, 80), (32, 32)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        assert float((ours(x) - ref(x)).abs().max()) < 1e-4, size
    with pytest.raises(ValueError, match="not divisible by the patch size 16x16"):
        ours(torch.randn(1, 3, 40, 64))
    fixed = vitlab.create_model(name, img_size=64, depth=2)
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        fixed(torch.randn(1, 3, 48, 80))


@torch.no_grad()
@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if "resnet" not in f and f != "alternet"])
def test_forward_tokens_of_forward_stem_is_forward_features(family):
    model = _small(family).eval()
    x = _input(model)
    tokens, layout = model.forward_stem(x)
    assert tokens.shape[1] == layout.num_tokens
    torch.testing.assert_close(model.forward_tokens(tokens, layout), model.forward_features(x), rtol=0, atol=0)
