"""CSwin's cross-shaped stripe attention (Dong et al., "CSWin Transformer", CVPR 2022, §3.1 and
the official ``LePEAttention``) recomputed independently with einsum from the state dict only
(``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.lepe.{b}}``), for the block's head
count, against the model's attention half from ``forward_intermediates``.

Heads change neither the parameters nor the MACs, so only a computation like this one sees a
model that splits its channels into the wrong number of heads."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from parity import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 4, 4, 8), split_size=(1, 2, 2, 2),
          num_classes=5)
# stage maps 16, 8, 4, 2; stripes 1, 2, 2 wide; the last stage attends over the whole map


def _stripes(t, h, w, sh, sw):
    """(B, H, W, C) -> (B * H/sh * W/sw, sh * sw, C): windows of sh x sw, raster order inside."""
    b, _, _, c = t.shape
    t = t.reshape(b, h // sh, sh, w // sw, sw, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(-1, sh * sw, c)


def _unstripe(t, b, h, w, sh, sw):
    c = t.shape[-1]
    t = t.reshape(b, h // sh, w // sw, sh, sw, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, h, w, c)


def _branch(q, k, v, conv_w, conv_b, heads, h, w, sh, sw):
    """One LePE attention branch on (B, H, W, C') maps: softmax(q kᵀ / sqrt(d)) v + dwconv3x3(v),
    every stripe separately (the conv sees zero padding at the stripe border)."""
    b, c = q.shape[0], q.shape[-1]
    d = c // heads
    qs, ks, vs = (_stripes(t, h, w, sh, sw) for t in (q, k, v))  # (N, L, C')
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d)  # noqa: E731
    logits = torch.einsum("nlhd,nmhd->nhlm", split(qs), split(ks)) * d ** -0.5
    out = torch.einsum("nhlm,nmhd->nlhd", logits.softmax(-1), split(vs)).reshape(qs.shape)
    vmap = vs.reshape(-1, sh, sw, c).permute(0, 3, 1, 2)
    lepe = F.conv2d(vmap, conv_w, conv_b, padding=1, groups=c).permute(0, 2, 3, 1).reshape(qs.shape)
    return _unstripe(out + lepe, b, h, w, sh, sw)


def reference_attention_half(sd, prefix, x, heads, split):
    """x + proj(CSwin attention(norm1(x))) for tokens x given as a (B, C, H, W) map."""
    b, c, h, w = x.shape
    t = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    y = F.layer_norm(t, (c,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"])
    q, k, v = F.linear(y, sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"]).chunk(3, dim=-1)
    lepe = lambda i: (sd[f"{prefix}attn.lepe.{i}.weight"], sd[f"{prefix}attn.lepe.{i}.bias"])  # noqa: E731
    if f"{prefix}attn.lepe.1.weight" not in sd:  # one branch, all heads, the whole map
        out = _branch(q, k, v, *lepe(0), heads, h, w, h, w)
    else:  # heads/2 in vertical stripes (H x sw) on the first half of the channels, horizontal on the rest
        half = c // 2
        out = torch.cat([_branch(q[..., :half], k[..., :half], v[..., :half], *lepe(0), heads // 2, h, w, h, split),
                         _branch(q[..., half:], k[..., half:], v[..., half:], *lepe(1), heads // 2, h, w, split, w)],
                        dim=-1)
    out = F.linear(out, sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    return (t + out).permute(0, 3, 1, 2)


def _block_pairs(model, x):
    """(block prefix, stage, input map, attention-half output map) for every block."""
    inter = model.forward_halves(x)
    for prev, cur in zip(inter, inter[1:]):
        if cur.kind == "attn":
            prefix = cur.name[: -len("attn")]
            yield prefix, int(prefix.split(".")[1]), prev.feature, cur.feature


def _max_errors(model, x, heads_of_stage):
    sd = model.state_dict()
    errs = {}
    with torch.no_grad():
        for prefix, i, x_in, x_out in _block_pairs(model, x):
            ref = reference_attention_half(sd, prefix, x_in, heads_of_stage[i], KW["split_size"][i])
            errs[prefix] = float((ref - x_out).abs().max()) / float(x_out.abs().max())
    return errs


def test_stripe_attention_equals_independent_einsum():
    model = randomize_(vitlab.create_model("cswin_tiny_224", **KW), seed=0).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    errs = _max_errors(model, x, KW["num_heads"])
    assert len(errs) == 4
    assert max(errs.values()) < 1e-5, errs
    # the reference is sensitive to the head count: doubled heads disagree in every block
    doubled = _max_errors(model, x, tuple(2 * h for h in KW["num_heads"]))
    assert min(doubled.values()) > 1e-3, doubled


def test_a_model_with_doubled_heads_fails_the_reference():
    kw = dict(KW, num_heads=tuple(2 * h for h in KW["num_heads"]))
    model = randomize_(vitlab.create_model("cswin_tiny_224", **kw), seed=0).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    errs = _max_errors(model, x, KW["num_heads"])  # the recipe's heads, a model with twice as many
    assert min(errs.values()) > 1e-3, errs
