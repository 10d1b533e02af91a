"""CvT ("CvT: Introducing Convolutions to Vision Transformers", Wu et al., ICCV 2021) and its convolutional
projection part.  timm has no CvT, so the reference is an independent re-implementation of the official code's
structure (microsoft/CvT ``lib/models/cls_cvt.py``: its module names, ``dim ** -0.5`` logit scale, QuickGELU,
class token only in the last stage) written here with einsum; every parameter and BatchNorm statistic is
randomised (tests/parity.py ``randomize_``) and loaded through :func:`cvt_from_official`."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from parity import randomize_
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.models.cvt import cvt_from_official, cvt_to_official

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"cvt_13_224": ((64, 192, 384), (1, 3, 6), (1, 2, 10)), "cvt_13_384": ((64, 192, 384), (1, 3, 6), (1, 2, 10)),
         "cvt_21_224": ((64, 192, 384), (1, 3, 6), (1, 4, 16)), "cvt_21_384": ((64, 192, 384), (1, 3, 6), (1, 4, 16)),
         "cvt_w24_384": ((192, 768, 1024), (3, 12, 16), (2, 2, 20))}
PAPER_PARAMS = {"cvt_13_224": 20e6, "cvt_13_384": 20e6, "cvt_21_224": 32e6, "cvt_21_384": 32e6, "cvt_w24_384": 277e6}
SMALL = dict(img_size=64, embed_dims=(16, 48, 64), num_heads=(1, 3, 4), depths=(1, 2, 2), num_classes=7)


# -- the reference: the official module layout, computed independently ---------------------------------------
def _dw_bn(dim, stride):
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(dim, dim, 3, stride, 1, bias=False, groups=dim),
                                     bn=nn.BatchNorm2d(dim)))


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.conv_proj_q, self.conv_proj_k, self.conv_proj_v = _dw_bn(dim, 1), _dw_bn(dim, 2), _dw_bn(dim, 2)
        self.proj_q, self.proj_k, self.proj_v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, h, w, ncls):
        b, n, c = x.shape
        cls, fm = x[:, :ncls], x[:, ncls:].transpose(1, 2).reshape(b, c, h, w)
        qkv = [lin(torch.cat([cls, conv(fm).flatten(2).transpose(1, 2)], 1)).reshape(b, -1, self.heads, c // self.heads)
               for conv, lin in ((self.conv_proj_q, self.proj_q), (self.conv_proj_k, self.proj_k),
                                 (self.conv_proj_v, self.proj_v))]
        attn = (torch.einsum("bihd,bjhd->bhij", qkv[0], qkv[1]) * c ** -0.5).softmax(-1)  # scale: the whole dim
        return self.proj(torch.einsum("bhij,bjhd->bihd", attn, qkv[2]).reshape(b, n, c))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), RefAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, h, w, ncls):
        x = x + self.attn(self.norm1(x), h, w, ncls)
        y = self.mlp.fc1(self.norm2(x))
        return x + self.mlp.fc2(y * torch.sigmoid(1.702 * y))  # QuickGELU


class RefCvT(nn.Module):
    """stage{i}.{patch_embed.{proj,norm}, blocks, cls_token (last stage)}, norm, head."""

    def __init__(self, dims, heads, depths, num_classes=1000):
        super().__init__()
        cin = 3
        for i, (d, h, n) in enumerate(zip(dims, heads, depths)):
            st = nn.Module()
            st.patch_embed = nn.Module()
            st.patch_embed.proj = nn.Conv2d(cin, d, 7 if i == 0 else 3, 4 if i == 0 else 2, 2 if i == 0 else 1)
            st.patch_embed.norm = nn.LayerNorm(d)
            st.blocks = nn.ModuleList([RefBlock(d, h) for _ in range(n)])
            if i == len(dims) - 1:
                st.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            setattr(self, f"stage{i}", st)
            cin = d
        self.norm, self.head = nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes)
        self.num_stages = len(dims)

    def stages(self, x):
        """The per-stage maps (B, C, H, W) and the last stage's class token."""
        maps, cls = [], None
        for i in range(self.num_stages):
            st = getattr(self, f"stage{i}")
            x = st.patch_embed.proj(x)
            b, c, h, w = x.shape
            t = st.patch_embed.norm(x.flatten(2).transpose(1, 2))
            ncls = 1 if hasattr(st, "cls_token") else 0
            t = torch.cat([st.cls_token.expand(b, -1, -1), t], 1) if ncls else t
            for blk in st.blocks:
                t = blk(t, h, w, ncls)
            cls, x = t[:, :ncls], t[:, ncls:].transpose(1, 2).reshape(b, c, h, w)
            maps.append(x)
        return maps, cls

    def forward(self, x):
        return self.head(self.norm(self.stages(x)[1][:, 0]))


def _pair(**kw):
    cfg = {**SMALL, **kw}
    ref = randomize_(RefCvT(cfg["embed_dims"], cfg["num_heads"], cfg["depths"], cfg["num_classes"]), seed=3).eval()
    ours = vitlab.create_model("cvt_13_224", **cfg)
    ours.load_state_dict(cvt_from_official(ref.state_dict()), strict=True)
    return ref, ours.eval()


# -- parity with the official structure ----------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])  # any input size: the maps come from the convs
def test_logits_and_intermediates_equal_reference(size):
    ref, ours = _pair()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    want, got = ref(x), ours(x)
    assert want.std() > 0.1 and float((want[0] - want[1]).abs().max()) > 1e-2  # informative logits
    assert float((got - want).abs().max()) < 1e-4 * (1 + float(want.abs().max()))
    maps, _ = ref.stages(x)
    inter = ours.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in inter] == [tuple(m.shape) for m in maps]
    assert max(float((a - b).abs().max()) for a, b in zip(inter, maps)) < 1e-4
    assert [d["reduction"] for d in ours.feature_info] == [4, 8, 16]


def test_state_dict_round_trip_and_keys_of_every_size():
    ref, ours = _pair()
    back = cvt_to_official(ours.state_dict())
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    for name, (dims, heads, depths) in SIZES.items():
        with torch.device("meta"):
            model, official = vitlab.create_model(name), RefCvT(dims, heads, depths)
        assert cvt_to_official(model.state_dict()).keys() == official.state_dict().keys(), name


@pytest.mark.parametrize("name", sorted(SIZES))
def test_param_counts_equal_official_and_paper(name):
    with torch.device("meta"):
        n = sum(p.numel() for p in vitlab.create_model(name).parameters())
        official = sum(p.numel() for p in RefCvT(*SIZES[name]).parameters())
    assert n == official
    assert abs(n - PAPER_PARAMS[name]) <= 0.5e6, (name, n)  # Table 2 gives whole millions


# -- the convolutional projection part against explicit computation ------------------------------------------
def _explicit_attention(sd, x, grid, ncls, heads, stride=2):
    """proj(softmax(q k^T / sqrt(d)) v) with q, k, v = Linear(BN(dwconv(map))) written out from the state dict."""
    b, n, c = x.shape
    fm = x[:, ncls:].transpose(1, 2).reshape(b, c, *grid)

    def branch(t, s):
        y = F.conv2d(fm, sd[f"conv_proj_{t}.conv.weight"], stride=s, padding=1, groups=c)
        y = F.batch_norm(y, sd[f"conv_proj_{t}.bn.running_mean"], sd[f"conv_proj_{t}.bn.running_var"],
                         sd[f"conv_proj_{t}.bn.weight"], sd[f"conv_proj_{t}.bn.bias"], eps=1e-5)
        y = torch.cat([x[:, :ncls], y.flatten(2).transpose(1, 2)], 1)
        return F.linear(y, sd[f"proj_{t}.weight"], sd[f"proj_{t}.bias"]).reshape(b, -1, heads, c // heads)

    q, k, v = branch("q", 1), branch("k", stride), branch("v", stride)
    attn = (torch.einsum("bihd,bjhd->bhij", q, k) * (c // heads) ** -0.5).softmax(-1)
    out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, c)
    return F.linear(out, sd["proj.weight"], sd["proj.bias"]), attn


@torch.no_grad()
@pytest.mark.parametrize("grid,ncls,stride", [((5, 6), 1, 2), ((4, 4), 0, 2), ((3, 5), 2, 1)])
def test_conv_projection_equals_explicit(grid, ncls, stride):
    layout = TokenLayout(grid, ncls)
    attn = randomize_(MultiHeadAttention(12, 3, projection=("conv", dict(stride_kv=stride)), layout=layout)).eval()
    x = torch.randn(2, layout.num_tokens, 12)
    want, probs = _explicit_attention(attn.state_dict(), x, grid, ncls, 3, stride)
    assert float((attn(x, layout) - want).abs().max()) < 1e-5
    with record_attention(attn) as rec:
        attn(x, layout)
    (got,), (keys,) = rec.last().values(), rec.last_layouts().values()
    assert float((got - probs).abs().max()) < 1e-6
    assert keys.grid == tuple(-(-g // stride) for g in grid) and keys.num_tokens == probs.shape[-1]


@torch.no_grad()
def test_conv_projection_in_windows_convolves_each_window():
    """Every grouping hands its groups' maps to the projection: in 3x3 windows each window is convolved alone
    (zero padding at the window border), its keys on a 2x2 grid."""
    layout = TokenLayout((6, 6))
    attn = randomize_(MultiHeadAttention(8, 2, projection="conv", grouping=("window", dict(window_size=3)),
                                         layout=layout)).eval()
    x = torch.randn(2, 36, 8)
    fm = x.reshape(2, 6, 6, 8)
    want = torch.empty_like(fm)
    for i in range(2):
        for j in range(2):
            win = fm[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3].reshape(2, 9, 8)
            out, _ = _explicit_attention(attn.state_dict(), win, (3, 3), 0, 2)
            want[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3] = out.reshape(2, 3, 3, 8)
    assert float((attn(x, layout) - want.reshape(2, 36, 8)).abs().max()) < 1e-5
    with record_attention(attn) as rec:
        attn(x, layout)
    (probs,), (keys,) = rec.last().values(), rec.last_layouts().values()
    assert probs.shape == (8, 2, 9, 4) and keys.grid == (2, 2)


@pytest.mark.parametrize("kw,words", [
    (dict(modifiers=("lsa",)), "modifier 'lsa' needs every query to be a key"),
    (dict(position=("relative",)), "position bias 'relative' needs every query to be a key"),
    (dict(position=("lepe",)), "position bias 'lepe' needs every query to be a key"),
    (dict(grouping=("stripes", dict(split_size=2))), "grouping 'stripes' cuts keys and queries"),
    (dict(grouping="class_query"), "grouping 'class_query' asks with the prefix tokens only"),
])
def test_conv_projection_refuses_what_strided_keys_forbid(kw, words):
    with pytest.raises(ValueError, match=words):
        prefix = int(kw.get("grouping") == "class_query")
        MultiHeadAttention(8, 2, projection="conv", layout=TokenLayout((4, 4), prefix), **kw)
    if "grouping" not in kw:  # keys at stride 1 are the queries: allowed
        MultiHeadAttention(8, 2, projection=("conv", dict(stride_kv=1)), layout=TokenLayout((4, 4)), **kw)


# -- the family's part options ---------------------------------------------------------------------------------
def _attn(model, stage=-1):
    return model.stages[stage].blocks[0].attn


def test_official_scale_and_linear_cost_cores_keep_every_key():
    model = vitlab.create_model("cvt_13_224", **SMALL)
    assert _attn(model).scale == pytest.approx(64 ** -0.5) and _attn(model, 1).scale == pytest.approx(48 ** -0.5)
    plain = vitlab.create_model("cvt_13_224", scale_by_dim=False, **SMALL)
    assert _attn(plain).scale == pytest.approx(16 ** -0.5)
    for core in ("focused_linear", "cross_covariance"):  # FLatten's rule: a linear-cost core attends everywhere
        assert _attn(vitlab.create_model("cvt_13_224", core=core, **SMALL)).projection.stride_kv == 1
    assert _attn(model).projection.stride_kv == 2


def test_part_options_reach_every_block():
    m = vitlab.create_model("cvt_13_224", mixer="cosine", mixer_kwargs=dict(tau=5.0), norm="rms", featscale=True,
                            branch_scale="layerscale", shortcut_init=0.3, modifiers=("talking_heads",),
                            wiring="post", **SMALL)
    blocks = [b for s in m.stages for b in s.blocks]
    assert all(b.attn.core.name == "cosine" and float(b.attn.tau) == 5.0 and hasattr(b.attn, "proj_l")
               for b in blocks)
    assert all(b.wiring == "post" and b.featscale is not None for b in blocks)
    assert all(torch.allclose(b.ls1.gamma, torch.full_like(b.ls1.gamma, 0.3)) for b in blocks)
    assert type(m.norm).__name__ == type(blocks[0].norm1).__name__ == type(m.patch_embed.norm).__name__ != "LayerNorm"
    pool = vitlab.create_model("cvt_13_224", mixer="pooling", **SMALL)
    assert not any(hasattr(b.attn, "conv_proj_q") for s in pool.stages for b in s.blocks)
    with pytest.raises(ValueError, match="tua"):
        vitlab.create_model("cvt_13_224", mixer_kwargs=dict(tua=5), **SMALL)
    with pytest.raises(ValueError, match="modifier 'lsa'"):
        vitlab.create_model("cvt_13_224", modifiers=("lsa",), **SMALL)


def test_drop_path_float_is_linear_and_per_stage_is_official():
    rates = lambda m: [float(getattr(b.drop_path1, "drop_prob", 0.0)) for s in m.stages for b in s.blocks]  # noqa: E731
    lin = vitlab.create_model("cvt_13_224", drop_path_rate=0.4, **SMALL)
    assert rates(lin) == pytest.approx([0.4 * i / 4 for i in range(5)])
    per = vitlab.create_model("cvt_13_224", drop_path_rate=(0.0, 0.0, 0.2), **SMALL)
    assert rates(per) == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.2])


# -- the model contract ----------------------------------------------------------------------------------------
def test_contract_record_heads_and_groups():
    from timm.optim import param_groups_layer_decay

    model = vitlab.create_model("cvt_13_224", **SMALL)
    x = torch.randn(2, 3, 64, 64)
    with record_attention(model) as rec:
        model(x)
    maps, layouts = rec.last(), rec.last_layouts()
    assert len(maps) == 5 and all(layouts[n].num_tokens == p.shape[-1] for n, p in maps.items())
    assert maps["stages.2.blocks.0.attn"].shape == (2, 4, 1 + 16, 1 + 4)  # class token + 4x4 queries, 2x2 keys
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len({g["lr_scale"] for g in groups}) >= 5 and "cls_token" in model.no_weight_decay()
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")
    avg = vitlab.create_model("cvt_13_224", cls_token=False, **SMALL).eval()
    feats = avg.forward_features(x)
    assert torch.allclose(avg(x), avg.head(feats.mean(1)), atol=1e-6)


# -- vit-pytorch's class with vitlab's model ---------------------------------------------------------------------
@torch.no_grad()
def test_vit_pytorch_readme_example_runs_with_the_import_changed():
    import vit_pytorch.cvt

    from vitlab.compat.vit_pytorch.cvt import CvT

    kw = dict(num_classes=1000, s1_emb_dim=64, s1_emb_kernel=7, s1_emb_stride=4, s1_proj_kernel=3,
              s1_kv_proj_stride=2, s1_heads=1, s1_depth=1, s1_mlp_mult=4, s2_emb_dim=192, s2_emb_kernel=3,
              s2_emb_stride=2, s2_proj_kernel=3, s2_kv_proj_stride=2, s2_heads=3, s2_depth=2, s2_mlp_mult=4,
              s3_emb_dim=384, s3_emb_kernel=3, s3_emb_stride=2, s3_proj_kernel=3, s3_kv_proj_stride=2, s3_heads=4,
              s3_depth=10, s3_mlp_mult=4, dropout=0.)
    img = torch.randn(1, 3, 224, 224)
    v = CvT(**kw).eval()
    assert v(img).shape == vit_pytorch.cvt.CvT(**kw).eval()(img).shape == (1, 1000)
    assert [s.dim for s in v.stages] == [64, 192, 384] and [len(s.blocks) for s in v.stages] == [1, 2, 10]
    assert _attn(v).num_heads == 4 and v.cls_token is not None  # the paper's class token, vit-pytorch's heads
    with pytest.raises(ValueError, match="s2_heads=5"):
        CvT(num_classes=10, s2_heads=5)
