"""Official-checkpoint converters for RegionViT and SepViT (timm has neither).

The references are re-implementations of the official module trees (IBM/RegionViT ``regionvit/regionvit.py``:
``PatchEmbed``, ``ConvAttBlock``, ``Projection``, ``R2LAttentionPlusFFN``, ``AttentionWithRelPos``,
``LayerNorm2d``; liwei109/SepViT ``classification/sepvit.py``: ``PatchEmbed``, ``PosCNN``, ``SepViTBlock``,
``SeparableAttention``) with the official attribute names, so their state dicts carry the official keys and
layouts.  Every parameter is randomised (tests/parity.py ``randomize_``), the state dict is converted, loaded
strictly into vitlab, every vitlab tensor is checked against the official tensor it came from, and the logits
agree (< 1e-4).  The references' parameter counts at the paper sizes equal vitlab's (and so the paper's)."""
import pytest
import torch
import torch.nn.functional as F
from parity import randomize_
from timm.layers import Mlp
from torch import nn

import vitlab
from vitlab.interop import load_timm_weights
from vitlab.interop.checkpoint import create_pretrained, save_model_files
from vitlab.interop.regionvit_official import regionvit_from_official, regionvit_to_official
from vitlab.interop.sepvit_official import sepvit_from_official

pytestmark = pytest.mark.usefixtures("one_thread")


# -- RegionViT, the official module tree ------------------------------------------------------------------------
class LayerNorm2d(nn.Module):
    """Official ``LayerNorm2d``: affine ``(1, C, 1, 1)``, biased variance, eps 1e-5."""

    def __init__(self, c: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(1, c, 1, 1)), nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5) \
            * self.weight + self.bias


class RegionPatchEmbed(nn.Module):
    """Official ``PatchEmbed``: ``3conv``, ``1conv`` (kernel 2p, stride p, padding p - 1) or ``linear``."""

    def __init__(self, kind: str, dim: int, patch: int):
        super().__init__()
        if kind == "3conv":
            self.proj = nn.Sequential(nn.Conv2d(3, dim // 4, 3, 2, 1), LayerNorm2d(dim // 4), nn.GELU(),
                                      nn.Conv2d(dim // 4, dim // 2, 3, 2, 1), LayerNorm2d(dim // 2), nn.GELU(),
                                      nn.Conv2d(dim // 2, dim, 3, 1, 1))
        elif kind == "1conv":
            self.proj = nn.Conv2d(3, dim, 2 * patch, patch, patch - 1)
        else:
            self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x)


class AttentionWithRelPos(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, side, o = heads, 2 * window - 1, window // 2
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos = nn.Parameter(torch.zeros(heads, side * side))
        # the official loop reads table[dy - y + w//2, dx - x + w//2] with Python's negative indexing
        self.index = [((dy - y + o) % side) * side + (dx - x + o) % side for y in range(window)
                      for x in range(window) for dy in range(window) for dx in range(window)]

    def forward(self, x, patch_attn: bool = False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        if patch_attn:  # the bias on local-local pairs only
            attn = attn + F.pad(self.rel_pos[:, self.index].reshape(self.heads, n - 1, n - 1), (1, 0, 1, 0))
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class R2LAttentionPlusFFN(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.norm0, self.norm1, self.norm2 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn, self.mlp = AttentionWithRelPos(dim, heads, window), Mlp(dim, 4 * dim)

    def forward(self, out, b: int):
        c = out.shape[-1]
        r = out[:, :1].reshape(b, -1, c)
        r = r + self.attn(self.norm0(r))  # regional self-attention, all regions of an image
        out = torch.cat([r.reshape(-1, 1, c), out[:, 1:]], 1)
        out = out + self.attn(self.norm1(out), patch_attn=True)
        return out + self.mlp(self.norm2(out))


class Projection(nn.Module):
    def __init__(self, cin: int, cout: int, downsample: bool):
        super().__init__()
        self.proj = (nn.Sequential(LayerNorm2d(cin), nn.GELU(), nn.Conv2d(cin, cout, 3, 2, 1, groups=cin))
                     if downsample else nn.Sequential(nn.Identity()))
        self.proj_cls = self.proj  # one module, two names: the official state dict holds it twice


class ConvAttBlock(nn.Module):
    def __init__(self, cin: int, cout: int, window: int, depth: int, heads: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList([Projection(cin, cout, downsample)] +
                                   [R2LAttentionPlusFFN(cout, heads, window) for _ in range(depth)])

    def forward(self, r, x):
        r, x = self.block[0].proj_cls(r), self.block[0].proj(x)
        (b, c, h, w), (rh, rw) = x.shape, r.shape[-2:]
        k = (h // rh, w // rw)  # convert_to_flatten_layout: one row per region, its token then its window
        loc = F.unfold(x, k, stride=k).transpose(1, 2).reshape(-1, c, k[0] * k[1]).transpose(1, 2)
        out = torch.cat([r.flatten(2).transpose(1, 2).reshape(-1, 1, c), loc], 1)
        for blk in self.block[1:]:
            out = blk(out, b)
        r = out[:, 0].reshape(b, rh * rw, c).transpose(1, 2).reshape(b, c, rh, rw)
        loc = out[:, 1:].transpose(1, 2).reshape(b, -1, k[0] * k[1] * c).transpose(1, 2)
        return r, F.fold(loc, (h, w), k, stride=k)


def _randomized(ref: nn.Module) -> nn.Module:
    """``randomize_`` on a tree with tied ``proj_cls`` twins (``named_modules`` lists each module once)."""
    twins = [m for m in ref.modules() if isinstance(m, Projection)]
    for m in twins:
        del m.proj_cls
    randomize_(ref)
    for m in twins:
        m.proj_cls = m.proj
    return ref


class OfficialRegionViT(nn.Module):
    def __init__(self, embed_dims, depths, num_heads, window_size, stem, num_classes=1000):
        super().__init__()
        widths = (embed_dims[0],) + tuple(embed_dims)  # the official embed_dim list repeats the first width
        self.patch_embed = RegionPatchEmbed(stem, embed_dims[0], 4)
        self.cls_token = RegionPatchEmbed("linear", embed_dims[0], 4 * window_size)
        self.layers = nn.ModuleList(ConvAttBlock(widths[i], widths[i + 1], window_size, d, num_heads[i], i > 0)
                                    for i, d in enumerate(depths))
        self.norm, self.head = nn.LayerNorm(embed_dims[-1], eps=1e-6), nn.Linear(embed_dims[-1], num_classes)

    def forward(self, img):
        x, r = self.patch_embed(img), self.cls_token(img)
        for layer in self.layers:
            r, x = layer(r, x)
        return self.head(self.norm(r.flatten(2).transpose(1, 2)).mean(1))


# -- SepViT, the official module tree ---------------------------------------------------------------------------
class SeparableAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, do_psa: bool):
        super().__init__()
        self.heads, self.ws, self.do_psa = heads, ws, do_psa
        self.DSA_qkv = nn.Linear(dim, 3 * dim)
        if do_psa:
            self.win_tokens_norm, self.PSA_qk = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hh: int, ww: int):
        b, nw, _, c = x.shape
        h, d, ws = self.heads, c // self.heads, self.ws
        q, k, v = self.DSA_qkv(x).reshape(b, nw, -1, 3, h, d).permute(3, 0, 1, 4, 2, 5)
        out = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1) @ v
        out = out.transpose(2, 3).reshape(b, nw, -1, c) + x  # the shortcut inside the attention
        if not self.do_psa:
            return self.proj(out.squeeze(1))
        maps = out[:, :, 1:]
        qk = self.PSA_qk(F.gelu(self.win_tokens_norm(out[:, :, 0]))).reshape(b, nw, 2, h, d).permute(2, 0, 3, 1, 4)
        vals = maps.reshape(b, nw, ws * ws, h, d).permute(0, 3, 1, 2, 4).reshape(b, h, nw, -1)
        o = ((qk[0] @ qk[1].transpose(-2, -1)) * d ** -0.5).softmax(-1) @ vals
        o = o.transpose(1, 2).reshape(b, nw, h, ws * ws, d).transpose(2, 3).reshape(b, nw, ws * ws, c) + maps
        return self.proj(o.reshape(b, hh // ws, ww // ws, ws, ws, c).transpose(2, 3).reshape(b, -1, c))


class SepViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, ws: int, side: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.mlp, self.ws = Mlp(dim, int(dim * mlp_ratio)), ws
        self.win_num = (side // ws) ** 2  # official: (224 // 4 // 2**stage // ws) ** 2, here for any image side
        self.attn = SeparableAttention(dim, heads, ws, self.win_num > 1)
        if self.win_num > 1:
            self.win_tokens = nn.Parameter(torch.zeros(1, self.win_num, 1, dim))

    def forward(self, x, hh: int, ww: int):
        b, _, c = x.shape
        ws = self.ws
        if self.win_num > 1:  # the window tokens join before norm1
            ax = x.reshape(b, hh // ws, ws, ww // ws, ws, c).transpose(2, 3).reshape(b, self.win_num, ws * ws, c)
            ax = torch.cat([self.win_tokens.expand(b, -1, -1, -1), ax], 2)
        else:
            ax = x.unsqueeze(1)
        x = x + self.attn(self.norm1(ax), hh, ww)
        return x + self.mlp(self.norm2(x))


class SepPatchEmbed(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.LayerNorm(cout)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[-2:]


class PosCNN(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))

    def forward(self, x, hh: int, ww: int):
        m = x.transpose(1, 2).reshape(x.shape[0], -1, hh, ww)
        return (self.proj(m) + m).flatten(2).transpose(1, 2)


class OfficialSepViT(nn.Module):
    def __init__(self, img_size, embed_dims, num_heads, mlp_ratios, depths, ws, num_classes=1000):
        super().__init__()
        self.patch_embeds = nn.ModuleList(SepPatchEmbed(3 if i == 0 else embed_dims[i - 1], c, 7 if i == 0 else 3,
                                                        4 if i == 0 else 2) for i, c in enumerate(embed_dims))
        self.pos_block = nn.ModuleList(PosCNN(c) for c in embed_dims)
        self.blocks = nn.ModuleList(nn.ModuleList(
            SepViTBlock(c, num_heads[k], mlp_ratios[k], ws[k][i], img_size // 4 // 2 ** k) for i in range(d))
            for k, (c, d) in enumerate(zip(embed_dims, depths)))
        self.norm, self.head = nn.LayerNorm(embed_dims[-1], eps=1e-6), nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x):
        b = x.shape[0]
        for i, (embed, blocks) in enumerate(zip(self.patch_embeds, self.blocks)):
            x, (hh, ww) = embed(x)
            for j, blk in enumerate(blocks):
                x = blk(x, hh, ww)
                x = self.pos_block[i](x, hh, ww) if j == 0 else x
            if i < len(self.blocks) - 1:
                x = x.reshape(b, hh, ww, -1).permute(0, 3, 1, 2)
        return self.head(self.norm(x).mean(1))


# -- the checks -------------------------------------------------------------------------------------------------
R_KW = dict(embed_dims=(16, 32, 64), depths=(1, 2, 1), num_heads=(2, 2, 4), window_size=2, num_classes=10)
S_KW = dict(embed_dims=(16, 32), num_heads=(2, 2), depths=(2, 2), mlp_ratios=(2, 2), num_classes=10)
S_WS = ((2, 2), (2, 4))  # official per-block lists: stage 1 has 16 windows, stage 2 four then one (no PSA)


def _sources(ours: dict, official: dict, skip=()) -> None:
    """Each vitlab tensor equals (flattened, bit for bit) exactly one official tensor, and each official tensor
    (tied twins counted once, ``skip`` aside) feeds exactly one vitlab tensor."""
    groups = {}
    for k, v in official.items():
        groups.setdefault(tuple(v.flatten().tolist()), []).append(k)
    used = {}
    for k, v in ours.items():
        if k in skip:
            continue
        hit = groups.get(tuple(v.flatten().tolist()))
        assert hit is not None, f"vitlab {k} equals no official tensor"
        assert tuple(hit) not in used, f"vitlab {k} and {used.get(tuple(hit))} come from the same {hit}"
        used[tuple(hit)] = k
    left = [g for g in groups.values() if tuple(g) not in used and not set(g) & set(skip)]
    assert not left, f"official tensors not loaded: {left[:5]}"


@pytest.mark.parametrize("stem", ["3conv", "1conv"])
def test_regionvit_official_state_dict_converts_loads_strictly_and_gives_the_official_logits(stem):
    ref = _randomized(OfficialRegionViT(R_KW["embed_dims"], R_KW["depths"], R_KW["num_heads"], 2, stem, 10)).eval()
    official = ref.state_dict()
    assert "layers.1.block.0.proj_cls.0.weight" in official and official["patch_embed.proj.1.weight" if stem ==
                                                                         "3conv" else "cls_token.proj.weight"].ndim == 4
    ours = vitlab.create_model("regionvit_tiny", img_size=32, stem=stem, **R_KW).eval()
    ours.load_state_dict(regionvit_from_official({"model": official}), strict=True)
    _sources(ours.state_dict(), official)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-4)
    assert want.std() > 0.1  # informative logits
    back = regionvit_to_official(ours.state_dict())  # the inverse gives the official tree's keys and layouts back
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)


def test_regionvit_official_file_is_recognised_by_the_loaders(tmp_path):
    ref = _randomized(OfficialRegionViT(R_KW["embed_dims"], R_KW["depths"], R_KW["num_heads"], 2, "3conv", 10)).eval()
    torch.save({"model": ref.state_dict(), "epoch": 299}, tmp_path / "regionvit_tiny.pth")  # official main.py's form
    model, rep = create_pretrained("regionvit_tiny", str(tmp_path / "regionvit_tiny.pth"), img_size=32, **R_KW)
    assert not rep.new and not rep.ignored and not rep.adapted
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=1e-4)
        again = load_timm_weights(vitlab.create_model("regionvit_tiny", img_size=32, **R_KW).eval(), ref.state_dict())
        torch.testing.assert_close(again(x), ref(x), rtol=0, atol=1e-4)
    weights, _ = save_model_files(model, str(tmp_path / "d"), "regionvit_tiny", dict(img_size=32, **R_KW))
    back, rep = create_pretrained(None, str(tmp_path / "d"))  # vitlab's own files keep (and reload) vitlab keys
    assert not rep.new and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                  model.state_dict().values()))


def test_regionvit_refuses_what_vitlab_lacks():
    ref = OfficialRegionViT((16, 32), (1, 1), (2, 2), 2, "3conv", 10)
    sd = dict(ref.state_dict(), **{"layers.1.peg.weight": torch.zeros(32, 1, 3, 3)})
    with pytest.raises(ValueError, match="'layers.1.peg.weight' has no vitlab counterpart"):
        regionvit_from_official(sd)
    sd = dict(ref.state_dict())
    sd["layers.1.block.0.proj_cls.2.bias"] = sd["layers.1.block.0.proj_cls.2.bias"] + 1
    with pytest.raises(ValueError, match="proj_cls.2.bias differs from its 'proj' twin"):
        regionvit_from_official(sd)


def _sepvit_pair():
    ref = OfficialSepViT(32, S_KW["embed_dims"], S_KW["num_heads"], S_KW["mlp_ratios"], S_KW["depths"], S_WS, 10)
    with torch.no_grad():
        randomize_(ref)
        for m in ref.modules():
            if isinstance(m, SepViTBlock) and m.win_num > 1:
                m.win_tokens.normal_(0, 0.5)  # far from norm1's image: the conversion must apply norm1
    ours = vitlab.create_model("sepvit_tiny", img_size=32, window_size=((2,), (2, 4)), **S_KW)
    return ref.eval(), ours.eval()


def test_sepvit_official_state_dict_converts_loads_strictly_and_gives_the_official_logits():
    ref, ours = _sepvit_pair()
    official = ref.state_dict()
    ours.load_state_dict(sepvit_from_official({"model": official}), strict=True)
    tokens = [k for k in ours.state_dict() if k.endswith("win_tokens")]
    assert len(tokens) == 3  # stage 1: both blocks; stage 2: the 4-window block only
    _sources(ours.state_dict(), official, skip=set(tokens) | {k for k in official if k.endswith("win_tokens")})
    for k in tokens:  # the official block normalises its window tokens with norm1 (eps 1e-6)
        i, j = k.split(".")[1], k.split(".")[3]
        blk = ref.blocks[int(i)][int(j)]
        want = F.layer_norm(blk.win_tokens, (blk.win_tokens.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
        torch.testing.assert_close(ours.state_dict()[k], want[0].detach(), rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-4)
    assert want.std() > 0.1


def test_sepvit_official_file_is_recognised_by_the_loaders(tmp_path):
    ref, _ = _sepvit_pair()
    torch.save({"model": ref.state_dict()}, tmp_path / "sepvit.pth")
    model, rep = create_pretrained("sepvit_tiny", str(tmp_path / "sepvit.pth"), img_size=32,
                                   window_size=((2,), (2, 4)), **S_KW)
    assert not rep.new and not rep.ignored and not rep.adapted
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=1e-4)
    save_model_files(model, str(tmp_path / "d"), "sepvit_tiny", dict(img_size=32, window_size=((2,), (2, 4)), **S_KW))
    back, rep = create_pretrained(None, str(tmp_path / "d"))
    assert not rep.new and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                  model.state_dict().values()))


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "base"])
def test_regionvit_official_tree_has_vitlabs_parameter_count(size):
    from vitlab.models.regionvit import _SIZES

    with torch.device("meta"):
        ref = OfficialRegionViT(window_size=7, **_SIZES[size])
        ours = vitlab.create_model(f"regionvit_{size}")
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("size,dims,heads,depths", [("tiny", (96, 192, 384, 768), (3, 6, 12, 24), (1, 2, 6, 2)),
                                                    ("base", (128, 256, 512, 1024), (4, 8, 16, 32), (1, 2, 14, 2))])
def test_sepvit_official_tree_has_vitlabs_parameter_count(size, dims, heads, depths):
    ws = [[7], [7, 14], [7, 14] * (depths[2] // 2), [7, 7]]  # the official recipes' window lists
    with torch.device("meta"):
        ref = OfficialSepViT(224, dims, heads, (4, 4, 4, 4), depths, ws)
        ours = vitlab.create_model(f"sepvit_{size}")
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
