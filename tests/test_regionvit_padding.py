"""RegionViT at image sizes that do not fit whole windows, against the official code's padding path.

The reference is the official forward (IBM/RegionViT ``regionvit/regionvit.py``) written out on the re-implemented
official module tree of test_official_regionvit_sepvit.py: ``PatchEmbed(extra_padding=True)`` pads the image around
its centre before the regional conv, ``convert_to_flatten_layout`` pads each stage's local map at the bottom and
right and builds its masks step by step as the official code does (``right``, ``bottom``, ``bottom_right``),
``AttentionWithRelPos`` fills masked logits with the dtype's minimum, ``convert_to_spatial_layout`` crops the
padding when the stage ends.  Every parameter is randomised; vitlab loads the official state dict and must give the
official logits and per-stage local maps (< 1e-4)."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from test_official_regionvit_sepvit import OfficialRegionViT, _randomized
from vitlab.interop.regionvit_official import regionvit_from_official
from vitlab.layers import record_attention
from vitlab.layers.regional import padding_keep
from vitlab.models.regionvit import stage_grids

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(embed_dims=(16, 32, 64), depths=(1, 2, 1), num_heads=(2, 2, 4), num_classes=10)


# -- the official padding path, written out ------------------------------------------------------------------------
def _official_mask(batch, hs, ws_, window, p_r, p_b, union=True):
    """``convert_to_flatten_layout``'s mask, built as the official code builds it (``union=False``: the last window
    masked as the intersection of its right and bottom masks instead, a check that the tests can tell them apart)."""
    n = 1 + window * window
    mask = torch.ones(hs * ws_, n, n)
    right = torch.zeros(n, n)
    tmp = torch.zeros(window, window)
    tmp[0:window - p_r, 0:window - p_r] = 1.0
    right[1:, 1:] = tmp.repeat(window, window)
    right[0, 0] = 1
    row = torch.tensor([1.0] * (window - p_r) + [0.0] * p_r).repeat(window)
    right[0, 1:], right[1:, 0] = row, row
    bottom = torch.zeros_like(right)
    top = window * (window - p_b) + 1
    bottom[0:top, 0:top] = 1.0
    bottom_right = right.clone()
    bottom_right[0:top, 0:top] = 1.0
    mask[ws_ - 1:(hs - 1) * ws_:ws_] = right
    mask[(hs - 1) * ws_:] = bottom
    mask[-1] = bottom_right if union else right * bottom
    return mask.repeat(batch, 1, 1)


def _attention(a, x, patch_attn=False, mask=None):
    """``AttentionWithRelPos.forward``: the bias on local-local logits, masked logits filled with the minimum."""
    b, n, c = x.shape
    q, k, v = a.qkv(x).reshape(b, n, 3, a.heads, c // a.heads).permute(2, 0, 3, 1, 4)
    attn = q @ k.transpose(-2, -1) * (c // a.heads) ** -0.5
    if patch_attn:
        attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + a.rel_pos[:, a.index].reshape(a.heads, n - 1, n - 1)
    if mask is not None:
        attn = attn.masked_fill(mask.unsqueeze(1).expand(-1, a.heads, -1, -1) == 0, torch.finfo(attn.dtype).min)
    return a.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


def _stage(layer, r, x, window, union):
    """``ConvAttBlock.forward`` (no PEG) with ``convert_to_flatten_layout`` / ``convert_to_spatial_layout``."""
    r, x = layer.block[0].proj_cls(r), layer.block[0].proj(x)
    (b, c, h, w), (rh, rw) = x.shape, r.shape[-2:]
    mask, p_r, p_b = None, 0, 0
    if h % (rh * window) or w % (rw * window):
        p_r, p_b = rw * window - w, rh * window - h
        x = F.pad(x, (0, p_r, 0, p_b))
        mask = _official_mask(b, rh, rw, window, p_r, p_b, union)
    h, w = x.shape[-2:]
    k = (window, window)
    loc = F.unfold(x, k, stride=k).transpose(1, 2).reshape(-1, c, window * window).transpose(-2, -1)
    out = torch.cat([r.flatten(2).transpose(-2, -1).reshape(-1, 1, c), loc], 1)
    for blk in layer.block[1:]:  # R2LAttentionPlusFFN
        reg = out[:, :1].reshape(b, -1, c)
        reg = reg + _attention(blk.attn, blk.norm0(reg))
        out = torch.cat([reg.reshape(-1, 1, c), out[:, 1:]], 1)
        out = out + _attention(blk.attn, blk.norm1(out), True, mask)
        out = out + blk.mlp(blk.norm2(out))
    r = out[:, 0:1].reshape(b, -1, c).transpose(-2, -1).reshape(b, c, rh, rw)
    loc = out[:, 1:].transpose(1, 2).reshape(b, -1, window * window * c).transpose(1, 2)
    x = F.fold(loc, (h, w), kernel_size=k, stride=k)
    if p_b > 0:
        x = x[:, :, :-p_b, :]
    if p_r > 0:
        x = x[:, :, :, :-p_r]
    return r, x


def official_forward(ref, img, window, union=True):
    """``RegionViT.forward`` with its padding path: (logits, each stage's local map)."""
    x = ref.patch_embed(img)
    p, (h, w) = 4 * window, img.shape[-2:]
    if h % p or w % p:  # PatchEmbed(extra_padding=True): both sides padded when either does not fit
        p_l, p_t = (p - w % p) // 2, (p - h % p) // 2
        img = F.pad(img, (p_l, (p - w % p) - p_l, p_t, (p - h % p) - p_t))
    r, maps = ref.cls_token(img), []
    for layer in ref.layers:
        r, x = _stage(layer, r, x, window, union)
        maps.append(x)
    return ref.head(ref.norm(r.flatten(2).transpose(1, 2)).mean(1)), maps


def _pair(stem, window):
    ref = _randomized(OfficialRegionViT(KW["embed_dims"], KW["depths"], KW["num_heads"], window, stem, 10)).eval()
    ours = vitlab.create_model("regionvit_tiny", img_size=32, stem=stem, window_size=window, **KW).eval()
    ours.load_state_dict(regionvit_from_official({"model": ref.state_dict()}), strict=True)
    return ref, ours


# -- the checks ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("regions,window,pad", [((3, 4), 2, (1, 1)), ((2, 3), 3, (2, 1)), ((3, 2), 3, (0, 2)),
                                                ((2, 2), 3, (1, 0)), ((1, 3), 2, (2, 2)), ((2, 2), 7, (6, 6))])
def test_padding_masks_equal_the_official_construction(regions, window, pad):
    keep = padding_keep(regions, window, pad)
    want = _official_mask(1, *regions, window, pad[1], pad[0])
    assert torch.equal(keep, want.bool())


@pytest.mark.parametrize("stem,window,hw", [
    ("3conv", 2, (36, 36)),  # local maps 9 / 5 / 3 against 5 / 3 / 2 regions of 2: one padded row and column each
    ("3conv", 2, (32, 44)),  # 32 fits but 44 does not: both padded, 5 x 6 regions, local 8 x 11 -> a whole
    ("1conv", 2, (41, 30)),  # window of padding (pad 2 = window) below; 1conv rounds its own way
    ("3conv", 3, (40, 40)),  # window 3: pads 2 / 1 / 0 in the three stages
    ("1conv", 3, (50, 37)),
])
def test_logits_and_stage_maps_equal_the_official_padding_path(stem, window, hw):
    torch.manual_seed(0)
    ref, ours = _pair(stem, window)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want, maps = official_forward(ref, x, window)
        got = ours(x)
        final, inter = ours.forward_intermediates(x)
        other, _ = official_forward(ref, x, window, union=False)
    assert want.std() > 0.1 and float((got - want).abs().max()) < 1e-4
    assert [t.shape for t in inter] == [t.shape for t in maps]
    assert all(float((a - b).abs().max()) < 1e-4 for a, b in zip(inter, maps))
    grids = stage_grids(*hw, stem, window, 3)
    assert [tuple(t.shape[-2:]) for t in maps] == [g for g, _ in grids]
    assert any(g[0] % window or g[1] % window or r != (g[0] // window) * (g[1] // window) for g, r in grids)
    assert float((other - want).abs().max()) > 1e-3  # the last window's union mask shows in the logits
    torch.testing.assert_close(ours.forward_head(final), got)


def test_the_official_path_equals_the_unpadded_one_where_the_windows_fit():
    """The written-out official forward is the module tree's own forward where nothing is padded (so it reads the
    tree as it should), and vitlab's fast path takes no padding there."""
    ref, ours = _pair("3conv", 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(official_forward(ref, x, 2)[0], ref(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)
        tokens, layout = ours.forward_stem(x)
    assert type(layout).__name__ == "TokenLayout" and tokens.shape[1] == 8 * 8 + 16 * 16


def test_model_contract_at_a_padded_size():
    torch.manual_seed(0)
    m = vitlab.create_model("regionvit_tiny", img_size=44, window_size=2, **KW)
    x = torch.randn(2, 3, 44, 44)
    out = m(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(p.grad is not None and torch.isfinite(p.grad).all()
                                             for p in m.parameters())
    m.eval()
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert [tuple(t.shape[1:]) for t in inter] == [(16, 11, 11), (32, 6, 6), (64, 3, 3)]
        halves = {h.name: h for h in m.forward_halves(x)}
        torch.testing.assert_close(inter[1], halves["layers.1.blocks.1.mlp"].feature)
        assert halves["layers.2.blocks.0.mlp"].prefix.shape[1] == 4  # 2 x 2 regions, 3 x 3 local map padded to 4 x 4
        assert final.shape[1] == 4 * (1 + 2 * 2)  # forward_features keeps the last stage's padded windows
        torch.testing.assert_close(m(x), m.head(m.norm(halves["layers.2.blocks.0.mlp"].prefix).mean(1)))
        with record_attention(m) as rec:
            m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # masked logits stay finite in bfloat16
            assert torch.isfinite(m(x)).all()
    probs = rec.maps["layers.0.blocks.0.attn"][1]  # LSA groups: 6 x 6 regions of 2 x 2, map 11 -> 12
    assert probs.shape == (2 * 36, 2, 5, 5)
    # the last column's windows (not the last row's): no query among the first tokens attends to the padded column
    right = probs.reshape(2, 6, 6, 2, 5, 5)[:, :5, 5]
    assert float(right[..., [0, 1, 3], :][..., [2, 4]].abs().max()) == 0.0
