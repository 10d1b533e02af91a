"""T2T-ViT (Yuan et al., ICCV 2021) and CCT (Hassani et al., 2021): parameter counts against the papers' tables,
a closed form of the official code and vit-pytorch; the soft split against an explicit patch gather; the token
layers against explicit attention matrices; the CCT tokenizer's grid formula and functional chain; sequence
pooling by hand; the 1-D sinusoid table by its formula; the model contract on small models."""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.layers import record_attention, sincos_1d
from vitlab.layers.tokenizers import CCTTokenizer, TokenPerformer, TokenTransformer, soft_split
from vitlab.models.cli import count_params

pytestmark = pytest.mark.usefixtures("one_thread")

# millions: T2T-ViT paper Tables 3-4 (= the official README's #params)
T2T_PAPER = {"t2t_vit_7": 4.3, "t2t_vit_10": 5.9, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5, "t2t_vit_19": 39.2,
             "t2t_vit_24": 64.1, "t2t_vit_t_14": 21.5, "t2t_vit_t_19": 39.2, "t2t_vit_t_24": 64.1}
T2T_SIZES = {"7": (256, 7, 2), "10": (256, 10, 2), "12": (256, 12, 2), "14": (384, 14, 3), "19": (448, 19, 3),
             "24": (512, 24, 3)}
# millions: the official README's CIFAR / ImageNet tables, with the position table the figure was counted with
CCT_README = {"cct_2_3x2_32": (0.284, "learned"), "cct_4_3x2_32": (0.482, "learned"),
              "cct_6_3x1_32": (3.168, "sincos_1d"), "cct_6_3x2_32": (3.327, "learned"),
              "cct_7_3x1_32": (3.760, "learned"), "cct_7_3x2_32": (3.853, "learned"),
              "cct_14_7x2_224": (22.29, "sincos_1d")}
SMALL = dict(depth=2, embed_dim=32, num_heads=2)


def _meta(name, **kw):
    with torch.device("meta"):
        return vitlab.create_model(name, **kw)


def _t2t_official_count(dim: int, depth: int, mlp_ratio: int, mixer: str, classes: int = 1000, e: int = 64) -> int:
    """The official t2t_vit.py's trainable parameters, in closed form (frozen table and random features aside)."""
    def token_layer(c_in):
        qkv = c_in * 3 * e + (3 * e if mixer == "performer" else 0)  # Token_transformer: qkv_bias=False
        return 2 * c_in + qkv + (e * e + e) + 2 * e + 2 * (e * e + e)
    stem = token_layer(3 * 49) + token_layer(e * 9) + (e * 9 * dim + dim)
    h = dim * mlp_ratio
    block = 4 * dim + 3 * dim * dim + (dim * dim + dim) + (dim * h + h) + (h * dim + dim)
    return stem + dim + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("name", sorted(T2T_PAPER))
def test_t2t_param_counts_match_official_code_and_paper(name):
    m = _meta(name)
    n = count_params(m)
    dim, depth, ratio = T2T_SIZES[name.rsplit("_", 1)[1]]
    assert n == _t2t_official_count(dim, depth, ratio, "transformer" if "_t_" in name else "performer")
    # the paper counts the official code's frozen Parameters too (position table, random features): our buffers
    frozen = sum(b.numel() for b in m.buffers())
    assert frozen == 197 * dim + (2 * 32 * 64 if "_t_" not in name else 0)
    assert abs((n + frozen) / (T2T_PAPER[name] * 1e6) - 1) < 0.01, n + frozen
    assert m.grid_size == (14, 14) and m.pos_embed.shape == (1, 197, dim)


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "cct_4_3x2_32", "cct_6_3x1_32", "cct_6_3x2_32", "cct_7_3x1_32",
                                  "cct_7_3x2_32", "cct_7_7x2_224", "cct_14_7x2_224", "cct_14_7x2_384"])
def test_cct_param_counts_match_official_code_and_readme(name):
    cct = pytest.importorskip("vit_pytorch.cct")  # vit-pytorch's CCT has the official code's parameters
    size, conv, img = name.split("_")[1:]
    kernel, layers = (int(v) for v in conv.split("x"))
    ours = _meta(name)
    ref = getattr(cct, f"cct_{size}")(img_size=int(img), kernel_size=kernel, n_conv_layers=layers,  # not on meta:
                                      num_classes=ours.num_classes, positional_embedding="learnable")  # .item()
    assert count_params(ours) == count_params(ref)
    if name in CCT_README:
        millions, pos = CCT_README[name]
        assert abs(count_params(_meta(name, pos_embed=pos)) / (millions * 1e6) - 1) < 0.01


def test_soft_split_is_an_explicit_patch_gather():
    x = torch.randn(2, 3, 9, 11)
    for k, s, p in ((7, 4, 2), (3, 2, 1), (3, 1, 0)):
        tokens, (h, w) = soft_split(x, k, s, p)
        xp = torch.zeros(2, 3, 9 + 2 * p, 11 + 2 * p)
        xp[:, :, p:p + 9, p:p + 11] = x
        rows = [i for i in range(0, xp.shape[2] - k + 1, s)]
        cols = [j for j in range(0, xp.shape[3] - k + 1, s)]
        assert (h, w) == (len(rows), len(cols)) and tokens.shape == (2, h * w, 3 * k * k)
        for a, i in enumerate(rows):
            for b, j in enumerate(cols):  # channel-major k x k neighbourhood, raster order of windows
                torch.testing.assert_close(tokens[:, a * w + b], xp[:, :, i:i + k, j:j + k].reshape(2, -1))


def _lin(layer, x):
    return x @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)


def _mlp(mlp, x):
    return _lin(mlp.fc2, F.gelu(_lin(mlp.fc1, x)))


@torch.no_grad()
def test_token_performer_matches_the_explicit_kernel_matrix():
    torch.manual_seed(0)
    layer = TokenPerformer(12, 8).eval()
    for p in layer.parameters():
        p.normal_(0, 0.3)
    m = layer.m
    torch.testing.assert_close(layer.w @ layer.w.t(), m * torch.eye(m), atol=1e-4, rtol=1e-4)  # orthogonal rows
    x = torch.randn(2, 5, 12)
    h = F.layer_norm(x, (12,), layer.norm1.weight, layer.norm1.bias)
    k, q, v = _lin(layer.kqv, h).split(8, dim=-1)
    phi = lambda t: torch.exp(t @ layer.w.t() - (t ** 2).sum(-1, keepdim=True) / 2) / math.sqrt(m)  # noqa: E731
    a = torch.einsum("bim,bjm->bij", phi(q), phi(k))  # the T x T kernel matrix the layer never forms
    y = v + _lin(layer.proj, torch.einsum("bij,bjc->bic", a, v) / (a.sum(-1, keepdim=True) + 1e-8))
    ref = y + _mlp(layer.mlp, F.layer_norm(y, (8,), layer.norm2.weight, layer.norm2.bias))
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_token_transformer_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    layer = TokenTransformer(12, 8).eval()
    for p in layer.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 5, 12)
    h = F.layer_norm(x, (12,), layer.norm1.weight, layer.norm1.bias)
    q, k, v = _lin(layer.attn.qkv, h).split(8, dim=-1)
    a = torch.softmax(torch.einsum("bic,bjc->bij", q, k) / math.sqrt(12), dim=-1)  # official scale: input width
    y = v + _lin(layer.attn.proj, a @ v)
    ref = y + _mlp(layer.mlp, F.layer_norm(y, (8,), layer.norm2.weight, layer.norm2.bias))
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("img,kernel,layers", [(32, 3, 1), (32, 3, 2), (33, 3, 2), (64, 7, 2), (30, 7, 1)])
def test_cct_tokenizer_grid_formula_and_functional_chain(img, kernel, layers):
    stride, pad = max(1, kernel // 2 - 1), max(1, kernel // 2)
    size = img
    for _ in range(layers):  # conv, then the 3x3 stride-2 padding-1 max-pool
        size = (size + 2 * pad - kernel) // stride + 1
        size = (size + 2 - 3) // 2 + 1
    tok = CCTTokenizer(img, (stride * 2) ** layers, 3, 16, kernel_size=kernel, n_conv_layers=layers)
    assert tok.grid_size == (size, size) and tok.num_patches == size * size
    x = torch.randn(2, 3, img, img)
    y = x
    for block in tok.conv_layers:
        assert block[0].bias is None
        y = F.max_pool2d(F.relu(F.conv2d(y, block[0].weight, stride=stride, padding=pad)), 3, 2, 1)
    torch.testing.assert_close(tok(x), y.flatten(2).transpose(1, 2))


@torch.no_grad()
def test_sequence_pooling_by_hand():
    m = vitlab.create_model("cct_7_3x1_32", **SMALL).eval()
    assert m.cls_token is None and 0.15 < float(m.pos_embed.std()) < 0.25  # official: trunc normal std 0.2
    feats = m.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 256, 32)
    g, b = m.attention_pool.weight[0], m.attention_pool.bias[0]
    pooled = torch.zeros(2, 32)
    for i in range(2):
        scores = [float(feats[i, n] @ g + b) for n in range(256)]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        for n in range(256):
            pooled[i] += weights[n] / sum(weights) * feats[i, n]
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.forward_head(feats), pooled @ m.head.weight.t() + m.head.bias, atol=1e-5,
                               rtol=1e-4)


def test_sincos_1d_table_by_its_formula():
    n, d = 7, 10
    table = sincos_1d(n, d)
    for p in range(n):
        for i in range(d):
            angle = p / 10000 ** (2 * (i // 2) / d)
            assert abs(float(table[p, i]) - (math.sin(angle) if i % 2 == 0 else math.cos(angle))) < 1e-6
    m = vitlab.create_model("t2t_vit_7", img_size=32, token_dim=16, **SMALL)
    torch.testing.assert_close(m.pos_embed, sincos_1d(5, 32)[None])  # class row + 2x2 grid
    assert "pos_embed" not in m.state_dict()  # fixed: rebuilt, never loaded


CONTRACT = {
    "t2t_performer": ("t2t_vit_7", dict(img_size=32, token_dim=16, **SMALL), (2, 2), 1),
    "t2t_transformer": ("t2t_vit_t_14", dict(img_size=32, token_dim=16, **SMALL), (2, 2), 1),
    "cct": ("cct_7_3x2_32", dict(SMALL), (8, 8), 0),
}


@pytest.mark.parametrize("family", sorted(CONTRACT))
def test_model_contract_on_small_models(family):
    name, kw, grid, prefix = CONTRACT[family]
    torch.manual_seed(0)
    m = vitlab.create_model(name, **kw)
    x = torch.randn(2, 3, 32, 32)
    loss = m(x).logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    stem = m.patch_embed.project if "t2t" in family else m.patch_embed.conv_layers[0][0]
    assert stem.weight.grad is not None and float(stem.weight.grad.abs().sum()) > 0
    m.eval()
    with torch.no_grad():
        final, feats = m.forward_intermediates(x, indices=[0, 1])
        torch.testing.assert_close(final, m.forward_features(x))
        assert [f.shape for f in feats] == [(2, 32, *grid)] * 2
        torch.testing.assert_close(m.forward_head(final), m(x))
        with record_attention(m) as rec:
            m(x)
        maps = rec.last()
        n = grid[0] * grid[1] + prefix
        assert maps["blocks.0.attn"].shape == (2, 2, n, n) and len(maps) == 2
        torch.testing.assert_close(maps["blocks.1.attn"].sum(-1), torch.ones(2, 2, n))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.pretrained_cfg["num_classes"] == 3
    assert m.default_cfg["input_size"] == (3, 32, 32)
    nwd = m.no_weight_decay()
    assert "blocks" in m.group_matcher() and ("pos_embed" in nwd) == (family == "cct")  # t2t: a fixed buffer
    assert ("attention_pool.bias" in nwd) == (family == "cct") and "attention_pool.weight" not in nwd
    m.set_grad_checkpointing(True)
    m.train()
    m(x).sum().backward()


def test_stems_in_other_backbones_and_errors():
    vit = vitlab.create_model("vit_tiny_patch4_32", embed="cct", **SMALL)  # patch 4: two 3x3 conv blocks
    assert vit.patch_embed.grid_size == (8, 8) and len(vit.patch_embed.conv_layers) == 2
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    t2t = vitlab.create_model("vit_tiny_patch4_32", embed="t2t", embed_kwargs=dict(splits=((3, 2, 1), (3, 2, 1))),
                              **SMALL)
    assert t2t.patch_embed.grid_size == (8, 8) and t2t(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="patch_size 4 does not match the T2T"):
        vitlab.create_model("vit_tiny_patch4_32", embed="t2t", **SMALL)
    with pytest.raises(ValueError, match="token_mixer"):
        vitlab.create_model("t2t_vit_7", img_size=32, token_mixer="lstm", **SMALL)
    with pytest.raises(ValueError, match="patch_size 8 does not match the CCT"):
        vitlab.create_model("cct_7_3x1_32", patch_size=8, **SMALL)
    with pytest.raises(ValueError, match="seqpool"):
        vit.reset_classifier(3, global_pool="seqpool")
    with pytest.raises(ValueError, match="img_size 32x32"):
        vitlab.create_model("cct_2_3x2_32", **SMALL)(torch.randn(1, 3, 40, 40))
    dyn = vitlab.create_model("cct_2_3x2_32", dynamic_img_size=True, **SMALL).eval()
    assert torch.isfinite(dyn(torch.randn(1, 3, 40, 40))).all()
    cct = vitlab.create_model("cct_2_3x2_32", **SMALL)
    cct.reset_classifier(4, global_pool="avg")
    with torch.no_grad():
        feats = cct.forward_features(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(cct.forward_head(feats, pre_logits=True), feats.mean(1))
