"""Tests for the survivors of the sixth mutation-testing pass (README, "Mutation testing"): the compat Recorder,
Extractor, ats_vit, MPP and MAE, RoPE for registers, qk_norm by name, ViT-5; each against an independent computation
(explicit softmax maps, vit-pytorch's classes, forward hooks, the rotation written out, shares counted)."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from parity import randomize_
from vitlab.compat.vit_pytorch.ats_vit import ViT as AtsViT
from vitlab.compat.vit_pytorch.cross_vit import CrossViT
from vitlab.compat.vit_pytorch.extractor import Extractor
from vitlab.compat.vit_pytorch.mae import MAE
from vitlab.compat.vit_pytorch.mpp import MPP
from vitlab.compat.vit_pytorch.recorder import Recorder
from vitlab.compat.vit_pytorch.vit import ViT
from vitlab.errors import UserError
from vitlab.layers import MultiHeadAttention, TokenLayout
from vitlab.models.vit5 import ViT5, vit5_kwargs
from vitlab.pretrain.mpp import MPP as PretrainMPP, mpp_corrupt, mpp_targets

vit_pytorch = pytest.importorskip("vit_pytorch")
import test_compat_readme2 as readme2  # noqa: E402
from test_compat_access import CROSS_SMALL, SMALL as ACCESS_SMALL, _explicit_maps, _img, _vit  # noqa: E402
from test_compat_ssl import SMALL as SSL_SMALL, _mpp_targets  # noqa: E402
from test_vit5 import _rms  # noqa: E402
from test_vit_rope_eva import _by_formula  # noqa: E402
from timm.models.vision_transformer import Attention as TimmAttention  # noqa: E402
from vit_pytorch.ats_vit import ViT as VpAtsViT  # noqa: E402
from vit_pytorch.extractor import Extractor as VpExtractor  # noqa: E402
from vit_pytorch.mpp import MPP as VpMPP  # noqa: E402
from vit_pytorch.vit import ViT as VpViT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ATS_SMALL = dict(image_size=32, patch_size=8, num_classes=5, dim=32, heads=2, dim_head=16, mlp_dim=48)  # 16 patches


class _Wrapped(nn.Module):
    """Another call convention: a list of images in, or one number per image / per batch out."""

    def __init__(self, vit: nn.Module, out: str):
        super().__init__()
        self.vit, self.out = vit, out

    def forward(self, img):
        logits = self.vit(torch.stack(img) if isinstance(img, list) else img)
        return {"rows": logits[:, 0], "scalar": logits.sum(), "logits": logits}[self.out]


# -- Recorder ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out,as_list", [("rows", True), ("scalar", False), ("logits", True)])
def test_recorder_batches_maps_by_prediction_rows_whatever_the_call_convention(out, as_list):
    model, x = _vit(), _img()
    with torch.no_grad():
        want = _explicit_maps(model, x)
        pred, maps = Recorder(_Wrapped(model, out))(list(x.unbind(0)) if as_list else x)
    assert torch.is_tensor(maps) and maps.shape == (2, 2, 2, 17, 17)  # (batch, layers, heads, n, n)
    torch.testing.assert_close(maps, want, atol=1e-6, rtol=1e-5)
    assert pred.shape == {"rows": (2,), "scalar": (), "logits": (2, 5)}[out]


def test_recorder_passes_arguments_takes_a_tuple_prediction_and_keeps_a_layout_per_map():
    """ats_vit.ViT's forward gives a tuple; with bounds that never bind the maps stack by the image batch."""
    model, x = AtsViT(**ATS_SMALL, depth=2, max_tokens_per_depth=(16, 16)).eval(), _img()
    with torch.no_grad():
        want_logits, want_ids = model(x, return_sampled_token_ids=True)
        rec = Recorder(model)
        for call in (lambda: rec(x, True), lambda: rec(x, return_sampled_token_ids=True)):
            (logits, ids), maps = call()
            torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)  # explicit path: rounding only
            assert torch.equal(ids, want_ids)
            assert torch.is_tensor(maps) and maps.shape == (2, 2, 2, 17, 17)
        torch.testing.assert_close(Recorder(model)(x)[0], want_logits, atol=1e-5, rtol=1e-5)
    model, deep = _vit(depth=1), Recorder(_vit(depth=3))  # one block: one map; a layout per map
    with torch.no_grad():
        _, maps = Recorder(model)(x)
        torch.testing.assert_close(maps, _explicit_maps(model, x), atol=1e-6, rtol=1e-5)
        deep(x)
    assert maps.shape == (2, 1, 2, 17, 17)
    assert len(deep.layouts) == len(deep.names) == 3 and all(lay.grid == (4, 4) for lay in deep.layouts)
    assert [lay.num_prefix for lay in deep.layouts] == [1, 1, 1]


# -- Extractor --------------------------------------------------------------------------------------------------------
def test_extractor_detach_options_crossvit_tuple_and_vit_pytorchs_own_modules():
    model, x = _vit(), _img()
    assert (ext := Extractor(model)).latents is None
    logits, emb = ext(x)
    assert logits.requires_grad and not emb.requires_grad  # vit-pytorch's clone().detach()
    torch.testing.assert_close(emb, model.forward_features(x).detach(), atol=0, rtol=0)
    assert "layer=forward_head input" in repr(ext) and "layer=blocks.1" in repr(Extractor(model, layer_name="blocks.1"))
    model, x = randomize_(CrossViT(**CROSS_SMALL), seed=2).eval(), _img()
    logits, emb = Extractor(model, layer_name="multi_scale_encoder", detach=False)(x)
    assert isinstance(emb, tuple) and len(emb) == 2 and all(t.requires_grad for t in emb)
    for a, b in zip(emb, model.forward_features(x)):  # the same tensors (no_grad would take the oneDNN path)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    grads = torch.autograd.grad(logits.sum(), emb)  # the head reads the class token of each branch only
    assert all(g[:, 1:].abs().sum() == 0 and g[:, 0].abs().sum() > 0 for g in grads)
    torch.manual_seed(0)  # vit-pytorch's names on vit-pytorch's own model are its modules, not vitlab's (was: refused)
    vp, x = VpViT(**ACCESS_SMALL).eval(), _img()
    with torch.no_grad():
        for name in ("to_patch_embedding", "mlp_head", "transformer"):
            want_logits, want = VpExtractor(vp, layer_name=name)(x)
            logits, got = Extractor(vp, layer_name=name)(x)
            assert torch.equal(got, want) and torch.equal(logits, want_logits), name


@torch.no_grad()
def test_extractor_hooks_a_module_under_any_name_and_keeps_non_tensor_outputs():
    """vit-pytorch's ATS attention returns ``(out, mask, None)`` where it does not sample: the None is kept."""
    vp, seen = VpAtsViT(**ATS_SMALL, depth=2, max_tokens_per_depth=(16, 4)).eval(), []
    vp.transformer.layers[0][0].register_forward_hook(lambda m, a, out: seen.append(out))
    _, got = Extractor(vp, layer_name="transformer.layers.0.0")(_img())
    assert isinstance(got, tuple) and len(got) == 3 and got[2] is None and seen[0][2] is None
    assert torch.equal(got[0], seen[0][0]) and torch.equal(got[1], seen[0][1])
    model, x = _vit(), _img()
    model.last_block = model.blocks[-1]  # an alias: named_modules() would list the module once, as blocks.1
    tokens, layout = model.forward_stem(x)
    want = model.blocks[1](model.blocks[0](tokens, layout), layout)
    assert torch.equal(Extractor(model, layer_name="last_block")(x)[1], want)


class _NoHead(nn.Sequential):
    """Offers ``forward_head`` but its forward never calls it, nor its container ``body``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
        self.forward_head = lambda x: x

    def forward(self, img):
        return self.body[1](self.body[0](img))


# -- ats_vit.ViT -------------------------------------------------------------------------------------------------------
def test_ats_bound_of_one_token_samples_where_vit_pytorch_does_and_dropouts_are_its():
    readme2.test_ats_samples_in_the_blocks_vit_pytorch_samples_in((16, 4, 1))
    assert AtsViT(**ATS_SMALL, depth=2, max_tokens_per_depth=(2, 1)).ats[-1].num_tokens == 1
    kw = dict(ATS_SMALL, depth=2, max_tokens_per_depth=(16, 8), dropout=0.25, emb_dropout=0.125)
    ours, ref = AtsViT(**kw), VpAtsViT(**kw)  # vit-pytorch's dropouts
    ps = lambda mod: {m.p for m in mod.modules() if isinstance(m, nn.Dropout)}  # noqa: E731
    assert ps(ours.blocks) == ps(ref.transformer) == {0.25}
    assert ours.blocks[0].attn.attn_drop.p == 0.25  # on the attention probabilities too, as vit-pytorch's
    assert ours.pos_drop.p == ref.dropout.p == 0.125


@torch.no_grad()
def test_ats_token_ids_are_as_wide_as_the_tokens_kept_and_every_patch_without_sampling():
    """Peaked class-token queries (as test_compat_readme2's) make images keep fewer tokens than the bound."""
    model = randomize_(AtsViT(**dict(ATS_SMALL, patch_size=4), depth=3, max_tokens_per_depth=(64, 40, 20)), seed=3)
    for blk in model.double().eval().blocks:
        blk.attn.qkv.weight[:32].mul_(6.0)
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    assert model(x, return_sampled_token_ids=True)[1].shape[1] == model.forward_features(x).shape[1] - 1 < 20
    model, x = AtsViT(**ATS_SMALL, depth=2, max_tokens_per_depth=(16, 16)).eval(), _img()
    assert getattr(model, "ats", None) is None  # no block can sample
    logits, ids = model(x, return_sampled_token_ids=True)
    assert torch.equal(logits, model(x)) and torch.equal(ids, torch.arange(16).expand(2, 16))
    meta = AtsViT(**ATS_SMALL, depth=2, max_tokens_per_depth=(8, 4)).to("meta").eval()  # ids on the images' device
    with torch.no_grad():  # the inference paths on the meta device (inplace.autocast_on)
        _, ids = meta(torch.empty(2, 3, 32, 32, device="meta"), return_sampled_token_ids=True)
    assert ids.device.type == "meta" and ids.shape == (2, 4)


# -- RoPE for register tokens, qk_norm by name, ViT-5's recipe ---------------------------------------------------------
def _register_rope_explicit(attn, x, grid, n_cls, regs, theta=100.0, reg_theta=100.0, order="xy", ref=None):
    """Global attention in float64, q and k turned by ``_by_formula``: ``n_cls`` tokens kept, ``regs`` registers
    on their own square grid with base ``reg_theta`` (ViT-5, Wang et al., 2026, sec. 3), the patches on ``grid``."""
    (b, n, c), h = x.shape, attn.num_heads
    d, s = c // h, math.isqrt(regs)
    w = {k: v.double() for k, v in attn.state_dict().items()}
    q, k, v = F.linear(x.double(), w["qkv.weight"], w.get("qkv.bias")).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)

    def rot(t):
        return torch.cat([t[:, :, :n_cls], _by_formula(t[:, :, n_cls:n_cls + regs], (s, s), reg_theta, order, None),
                          _by_formula(t[:, :, n_cls + regs:], grid, theta, order, ref)], 2)

    p = (rot(q) @ rot(k).transpose(-2, -1) * d ** -0.5).softmax(-1)
    return F.linear((p @ v).transpose(1, 2).reshape(b, n, c), w["proj.weight"], w["proj.bias"])


def _mha(dim, heads, grid, prefix, position):
    attn = MultiHeadAttention(dim, heads, position=position, layout=TokenLayout(grid, prefix)).eval()
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    return attn


@pytest.mark.parametrize("n_cls,regs,opts,reg_theta", [
    (1, 1, {}, 100.0),  # one register: a 1 x 1 grid, never turned
    (1, 9, {}, 100.0),  # nine: a 3 x 3 grid
    (0, 4, dict(rope_register_theta=7.0), 7.0),  # registers only, no class token
    (2, 4, dict(rope_register_theta=1.5, rope_order="yx"), 1.5),  # just above the bound
])
@torch.no_grad()
def test_register_rope_equals_the_rotation_written_out(n_cls, regs, opts, reg_theta):
    attn = _mha(16, 2, (3, 3), n_cls + regs, (("rope", dict(rope_registers=regs, **opts)),))
    x = torch.randn(2, n_cls + regs + 9, 16, generator=torch.Generator().manual_seed(regs))
    order = opts.get("rope_order", "xy")
    want = _register_rope_explicit(attn, x, (3, 3), n_cls, regs, reg_theta=reg_theta, order=order)
    torch.testing.assert_close(attn(x).double(), want, atol=1e-5, rtol=1e-5)


def test_qk_norm_rms_and_true_are_timms_and_vit5_uses_the_official_eps_and_defaults():
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0))
    for qk_norm, norm_layer in ((True, nn.LayerNorm), ("rms", functools.partial(nn.RMSNorm, eps=1e-6))):
        ours = MultiHeadAttention(48, 6, projection=("linear", dict(qk_norm=qk_norm))).eval()
        theirs = TimmAttention(48, num_heads=6, qkv_bias=True, qk_norm=True, norm_layer=norm_layer).eval()
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.5 if p.ndim == 1 else 0.0, 0.2)
            theirs.load_state_dict(ours.state_dict())
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    model = ViT5(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    tiny = torch.randn(2, 5, 32) * 1e-4  # mean square 1e-8: the eps (ViT-5's 1e-6) dominates
    with torch.no_grad():
        for norm in (ours.q_norm, model.norm, model.blocks[0].norm1, model.blocks[0].attn.k_norm):
            x = tiny[..., :norm.weight.shape[0]]
            torch.testing.assert_close(norm(x), _rms(x, norm.weight), atol=1e-7, rtol=1e-4)
    assert model.pretrained_cfg["architecture"] == "vit5"
    kw = vit5_kwargs()
    assert (kw["img_size"], kw["patch_size"], kw["reg_tokens"]) == (224, 16, 4)  # models_vit5.py's vit5_base
    (name, rope), = kw["attn_position"]
    assert name == "rope" and rope == dict(rope_theta=10000.0, rope_order="yx", rope_ref_grid=(14, 14),
                                           rope_registers=4, rope_register_theta=100.0)


@pytest.mark.parametrize("img_size,grid", [(256, (3, 3)), ((32, 48), (4, 6))])
@torch.no_grad()
def test_vit5_rope_turns_patches_in_training_grid_units(img_size, grid):
    """Patch coordinates in units of the training grid ``img_size // 8`` (official ``rope_size``), registers 2 x 2."""
    ref = tuple(s // 8 for s in ((img_size, img_size) if isinstance(img_size, int) else img_size))
    attn = _mha(32, 2, grid, 5, vit5_kwargs(img_size=img_size, patch_size=8)["attn_position"])
    x = torch.randn(2, 5 + math.prod(grid), 32, generator=torch.Generator().manual_seed(0))
    want = _register_rope_explicit(attn, x, grid, 1, 4, theta=10000.0, order="yx", ref=ref)
    torch.testing.assert_close(attn(x).double(), want, atol=1e-5, rtol=1e-5)
    model = ViT5(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 3)


# -- MPP's corruption shares and targets, the self-supervised compat wrappers ------------------------------------------
_ssl_vit = functools.partial(ViT, **SSL_SMALL)
_conv_vit = functools.partial(vitlab.create_model, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2, embed="conv")


def _pretrain_mpp(encoder=None, name="vit", **kw):
    return PretrainMPP(encoder if encoder is not None else _ssl_vit(), name, 32, 3, [0.5] * 3, [0.25] * 3, **kw)


def _mpp(enc=None, **kw):
    return MPP(transformer=enc if enc is not None else _ssl_vit(), **{"patch_size": 8, "dim": 32, **kw})


def _mae(enc=None, **kw):
    return MAE(encoder=enc if enc is not None else _ssl_vit(), **{"decoder_dim": 32, "decoder_heads": 4,
                                                                  "decoder_dim_head": 8, **kw})


_NOT = "is not supported by vitlab; expected"
_SQ = f"with a 4x6 patch grid='non-square' {_NOT} a square image_size"
_VL = f"{_NOT} a vitlab transformer (e.g. vitlab.compat.vit_pytorch.ViT)"
_SWIN = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
_SQUARE = "rope_registers must be a square number of register tokens (0, 1, 4, 9, ...), got "
_RUNS = " did not run in {}'s forward (the model runs its parts itself); "
REFUSALS = [  # (what the user does, the whole one-line message)
    (lambda: Recorder("vit"), "Recorder wraps a model (nn.Module), got str"),
    (lambda: Extractor(lambda x: x), "Extractor wraps a model (nn.Module), got function"),
    (lambda: Extractor(_vit(), layer=nn.Linear(2, 2)), "layer=Linear is not a submodule of ViT; pass one of its "
     "modules (e.g. vit.blocks[-1]) or a layer_name"),
    (lambda: Extractor(nn.Sequential(nn.Linear(3, 2))), "layer_name='transformer' needs a vitlab model with "
     "forward_head; Sequential has none: name a submodule instead"),
    (lambda: Extractor(CrossViT(**CROSS_SMALL), layer_save_input=True), "layer_save_input=True with layer_name="
     "'transformer' needs a model with forward_stem (a Backbone); CrossViT has none: name its first block instead, "
     "e.g. layer_name='blocks.0'"),
    (lambda: Extractor(_vit(), layer_name="blocks")(_img()),
     "'blocks'" + _RUNS.format("ViT") + "name one of its children that runs: 'blocks.0', 'blocks.1'"),
    (lambda: Extractor(_NoHead())(torch.randn(2, 3, 2, 2)),
     "'forward_head'" + _RUNS.format("_NoHead") + "choose another layer_name"),
    (lambda: Extractor(_NoHead(), layer_name="body")(torch.randn(2, 3, 2, 2)),
     "'body'" + _RUNS.format("_NoHead") + "name one of its children that runs: 'body.0', 'body.1'"),
    (lambda: AtsViT(**ATS_SMALL, depth=1, max_tokens_per_depth=(4,), emb_dropout=1.0),
     "ats_vit.ViT: emb_dropout=1.0 must be in [0, 1)"),
    (lambda: _mha(16, 2, (3, 3), 4, (("rope", dict(rope_registers=2)),)), _SQUARE + "2"),
    (lambda: _mha(16, 2, (3, 3), 4, (("rope", dict(rope_registers=-4)),)), _SQUARE + "-4"),
    (lambda: _mha(16, 2, (3, 3), 4, (("rope", dict(rope_registers=4, rope_register_theta=1.0)),)),
     "rope_register_theta must be > 1, got 1.0"),
    (lambda: _mha(24, 2, (2, 3, 2), 1, (("rope", dict(rope_registers=1)),)),
     "rope_registers rotates registers on a 2-D grid; these attention groups are 3-D"),
    (lambda: _mpp(patch_size=16), f"MPP: patch_size=16 {_NOT} the transformer's 8"),
    (lambda: _mpp(dim=16), f"MPP: dim=16 {_NOT} the transformer's 32"),
    (lambda: _mpp(channels=1), f"MPP: channels=1 {_NOT} the transformer's 3"),
    (lambda: _mpp(replace_prob=1.5), f"MPP: replace_prob=1.5 {_NOT} a probability in [0, 1]"),
    (lambda: _mpp(random_patch_prob=-0.1), f"MPP: random_patch_prob=-0.1 {_NOT} a probability in [0, 1]"),
    (lambda: _mpp(replace_prob=0.8, random_patch_prob=0.3),
     f"MPP: random_patch_prob=0.3 {_NOT} at most 1 - replace_prob = 0.2 (shares of the selected patches)"),
    (lambda: _mpp(max_pixel_val=0), f"MPP: max_pixel_val=0 {_NOT} a positive pixel range"),
    (lambda: _mpp(std=(0.5,) * 3), f"MPP: std=(0.5, 0.5, 0.5) {_NOT} mean and std given together (vit-pytorch "
     "ignores one alone)"),
    (lambda: _mpp(mean=(0.5,) * 3), f"MPP: mean=(0.5, 0.5, 0.5) {_NOT} mean and std given together (vit-pytorch "
     "ignores one alone)"),
    (lambda: _mpp(mean=(0.5,) * 2, std=(0.5,) * 3), f"MPP: mean/std=([0.5, 0.5], [0.5, 0.5, 0.5]) {_NOT} 3 values "
     "each (channels=3)"),
    (lambda: _mpp(mask_prob=1.0), "MPP: mask_prob=1.0; expected a fraction strictly between 0 and 1"),
    (lambda: _mpp(nn.Linear(2, 2)), f"MPP: transformer='Linear' {_VL}"),
    (lambda: _mpp(_ssl_vit(image_size=(32, 48))), f"MPP: transformer {_SQ}"),
    (lambda: _mpp(output_channel_bits=9), "MPP: --mpp-bits 9: expected 1 to 8 bits per channel"),
    (lambda: _mpp(_conv_vit()), "MPP: MPP cannot pretrain model vit_tiny_patch16_224: its stem mixes neighbouring "
     "patches; use a patchify stem (--model-kwargs ...,embed=patch) or --method simmim"),
    (lambda: _mae(masking_ratio=0.0), "MAE: masking_ratio=0.0; expected a fraction strictly between 0 and 1"),
    (lambda: _mae(decoder_dim=0), "MAE: decoder_dim=0, decoder_depth=1, decoder_heads=4 and decoder_dim_head=8 must be positive"),
    (lambda: _mae(decoder_depth=0), "MAE: decoder_dim=32, decoder_depth=0, decoder_heads=4 and decoder_dim_head=8 must be positive"),
    (lambda: _mae(decoder_heads=0), "MAE: decoder_dim=32, decoder_depth=1, decoder_heads=0 and decoder_dim_head=8 must be positive"),
    (lambda: _mae(decoder_dim_head=0), "MAE: decoder_dim=32, decoder_depth=1, decoder_heads=4 and decoder_dim_head=0 "
     "must be positive"),
    (lambda: MAE(encoder=nn.Linear(2, 2), decoder_dim=32), f"MAE: encoder='Linear' {_VL}"),
    (lambda: _mae(_ssl_vit(image_size=(32, 48))), f"MAE: encoder {_SQ}"),
    (lambda: _mae(_conv_vit()), "MAE: MAE cannot pretrain model vit_tiny_patch16_224: its stem is overlapping (a "
     "patch's pixels reach 3 other tokens, so removed pixels would leak into kept tokens); use a patchify stem (e.g. "
     "--model-kwargs ...,embed=patch) or use --method simmim instead (it keeps every token, so it works on any "
     "backbone)"),
    (lambda: _pretrain_mpp(vitlab.create_model("swin_tiny_patch4_window7_224", **_SWIN), "swin"), "MPP needs an "
     "isotropic transformer backbone (one token per patch to the end); model swin is not one; use --method simmim"),
    (lambda: _pretrain_mpp(bits=0), "--mpp-bits 0: expected 1 to 8 bits per channel"),
    (lambda: _pretrain_mpp(bits=9), "--mpp-bits 9: expected 1 to 8 bits per channel"),
    (lambda: _pretrain_mpp(_conv_vit(), "vitc"), "MPP cannot pretrain model vitc: its stem mixes neighbouring patches; "
     "use a patchify stem (--model-kwargs ...,embed=patch) or --method simmim"),
] + [(lambda r=r, q=q: _pretrain_mpp(replace_prob=r, random_prob=q),
      f"MPP's shares of the selected patches: replace_prob={r} and random_prob={q} must be >= 0 with a sum <= 1")
     for r, q in ((-0.1, 0.1), (0.5, -0.1), (0.9, 0.2), (0.6, 0.6))]


@pytest.mark.parametrize("build,message", REFUSALS)
def test_refusals_are_one_line_and_name_the_value_and_what_is_expected(build, message):
    with pytest.raises((ValueError, UserError)) as info:
        build()
    assert str(info.value) == message


def test_bounds_that_must_be_accepted_and_compat_mae_defaults_are_vit_pytorchs():
    for kw in (dict(bits=1), dict(bits=8), dict(replace_prob=0, random_prob=0), dict(replace_prob=.7, random_prob=.3)):
        assert (mpp := _pretrain_mpp(**kw)).head.out_features == 2 ** (3 * mpp.bits) and mpp.last == {}
    heads = lambda m: [b.num_heads for n, b in m.named_modules()  # noqa: E731
                       if n.startswith("decoder") and hasattr(b, "qkv")]
    assert heads(_mae(decoder_dim=8, decoder_heads=1)) == [1]  # one decoder head is enough
    mae = MAE(encoder=_ssl_vit(), decoder_dim=512)  # vit-pytorch's defaults: 1 block, 8 heads of 64, ratio 0.75
    mae(torch.randn(2, 3, 32, 32))
    assert mae.mask_ratio == 0.75 and mae.norm_pix_loss is False and heads(mae) == [8]
    assert mae.last["mask"].sum(1).tolist() == [16 - int(16 * 0.25)] * 2
    small = _mae(decoder_depth=2, masking_ratio=0.5)
    assert small.mask_ratio == 0.5 and heads(small) == [4, 4]


def test_mpp_corruption_is_reproducible_from_its_generator_alone_and_draws_from_every_patch():
    patches, mask, runs = torch.randn(8, 16, 12), torch.randn(1, 1, 12), []
    for global_seed in (1, 2):  # the global generator differs between the runs
        torch.manual_seed(global_seed)
        runs.append(mpp_corrupt(patches, 0.5, mask, torch.Generator().manual_seed(0), 0.4, 0.4))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    length = 4  # random patches come from every patch of the image, patch 0 too, and keep the dtype
    patches = torch.arange(length, dtype=torch.bfloat16).view(1, length, 1).expand(256, length, 3).contiguous()
    out, selected, kind = mpp_corrupt(patches, 1.0, torch.full((1, 1, 3), -1.0), replace_prob=0.0, random_prob=1.0,
                                      generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and bool((kind == 2).all())
    assert set(out[..., 0].unique().tolist()) == set(range(length))
    out, _, kind = mpp_corrupt(patches, 1.0, torch.full((1, 1, 3), -1.0), replace_prob=1.0, random_prob=0.0)
    assert out.dtype == torch.bfloat16 and bool((out == -1).all()) and bool((kind == 1).all())


def test_mpp_targets_and_compat_mpp_arguments_reach_the_trainer():
    """Every pixel clamped to [0, 1] before the mean, 3 bits by default; the compat defaults (no mean/std,
    max_pixel_val 1) give vit-pytorch's target; bits and shares are the ones passed."""
    raw = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.0 - 0.5  # outside [0, 1] too
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    imgs = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    target = mpp_targets(imgs, 4, mean, std)
    for b in range(3):
        for i, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            label = 0
            for ch in range(3):
                m = float(raw[b, ch, r:r + 4, c:c + 4].double().clamp(0.0, 1.0).mean())
                label += min(int(math.floor(m * 8)), 7) * 8 ** ch
            assert int(target[b, i]) == label, (b, i)
    img = torch.rand(64, 3, 32, 32)
    mpp = MPP(_ssl_vit(), 8, 32, output_channel_bits=2, mask_prob=0.5, replace_prob=0.5, random_patch_prob=0.3)
    mpp(img)
    assert torch.equal(mpp.last["target"], _mpp_targets(img, bits=2)) and mpp.head.out_features == 64
    assert (mpp.replace_prob, mpp.random_patch_prob) == (0.5, 0.3)
    kind, selected = mpp.last["kind"], mpp.last["selected"]
    shares = [float((kind == k).sum()) / float(selected.sum()) for k in (1, 2, 3)]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.06)
    (all_random := MPP(_ssl_vit(), 8, 32, mask_prob=0.5, replace_prob=0.0, random_patch_prob=1.0))(img[:4])
    assert bool((all_random.last["kind"][all_random.last["selected"]] == 2).all())
    assert mpp.mask_patch.shape == VpMPP(VpViT(**SSL_SMALL), patch_size=8, dim=32).mask_token.shape == (1, 1, 192)

