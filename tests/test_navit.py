"""NaViT (Dehghani et al., NeurIPS 2023) and the attention mask that travels with the tokens' layout.

Every check compares with an independent computation: attention by explicit einsum per image, each image run
alone, a re-run of the first-fit rule, timm's NaFlexViT (factorised embeddings + MAP head) with every parameter
randomised, parameter counts of timm's model of the same configuration.
"""
import math

import pytest
import torch

import vitlab
from vitlab.data.packing import PackingCollate, native_size_transform, packing_loader
from vitlab.layers import MultiHeadAttention, TokenLayout, record_attention
from vitlab.models.navit import NaViT, first_fit, pack_images

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(embed_dim=32, depth=2, num_heads=2)
SIZES = [(32, 16), (8, 24), (64, 20), (12, 12), (4, 4), (28, 36)]  # (H, W), all multiples of the patch (4)


def _images(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _navit(**kw):
    torch.manual_seed(0)
    return vitlab.create_model("navit_tiny_patch4", **{**SMALL, "max_len": 128, **kw})


def _ids(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


# -- the mask on the layout, inside the one attention module -------------------------------------------------------
def test_layout_mask_is_left_out_of_equality_and_checked():
    plain = TokenLayout((2, 3))
    masked = plain.with_mask(torch.ones(1, 6, dtype=torch.bool))
    assert masked == plain and hash(masked) == hash(plain) and masked.mask is not None
    assert {plain: 1}[masked] == 1
    with pytest.raises(ValueError, match="N = 6 tokens"):
        plain.with_mask(torch.ones(1, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean or float"):
        plain.with_mask(torch.ones(1, 6, 6, dtype=torch.long))


def _brute_attention(m, x, ids):
    """``m`` (a plain global MultiHeadAttention) on ``x (1, N, C)`` where token i attends only to tokens of
    its own image ``ids[i]``: explicit einsum per image, from the module's weights."""
    h, d = m.num_heads, m.head_dim
    qkv = torch.einsum("nc,oc->no", x[0], m.qkv.weight) + m.qkv.bias
    q, k, v = qkv.view(-1, 3, h, d).unbind(1)
    out = torch.zeros(x.shape[1], h, d)
    for img in ids.unique():
        sel = (ids == img).nonzero()[:, 0]
        logits = torch.einsum("ihd,jhd->hij", q[sel], k[sel]) * d ** -0.5
        out[sel] = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v[sel])
    return (torch.einsum("nk,ok->no", out.reshape(len(ids), -1), m.proj.weight) + m.proj.bias)[None]


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_block_diagonal_mask_equals_per_image_attention_on_both_paths(kind):
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2).eval()
    ids = _ids([5, 3, 7])
    x = torch.randn(1, len(ids), 16)
    keep = (ids[:, None] == ids[None, :])[None]
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    layout = TokenLayout((len(ids),), mask=mask)
    want = _brute_attention(m, x, ids)
    with torch.no_grad():
        fused = m(x, layout)
        with record_attention(m) as rec:
            explicit = m(x, layout)
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, want, atol=1e-5, rtol=1e-5)
    probs = rec.last()[""]
    assert probs.shape == (1, 2, 15, 15)
    assert (probs[keep[:, None].expand_as(probs).logical_not()] == 0).all()  # exactly zero, not just small
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 15))


def test_key_padding_mask_equals_dropping_the_keys():
    """A ``(B, N)`` key-padding mask (masked pretraining): kept queries see exactly the kept tokens."""
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 10, 16)
    keep = torch.rand(2, 10) > 0.4
    keep[:, 0] = True
    with torch.no_grad():
        out = m(x, TokenLayout((10,), mask=keep))
        for b in range(2):
            alone = m(x[b:b + 1, keep[b]], TokenLayout((int(keep[b].sum()),)))
            torch.testing.assert_close(out[b, keep[b]], alone[0], atol=1e-5, rtol=1e-5)


def test_mask_adds_to_position_bias_on_both_paths():
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2, position=("relative",), layout=TokenLayout((3, 4))).eval()
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 1.0)
    x = torch.randn(2, 12, 16)
    keep = torch.rand(2, 12, 12) > 0.5
    keep |= torch.eye(12, dtype=torch.bool)
    layout = TokenLayout((3, 4), mask=keep)
    with torch.no_grad():
        fused = m(x, layout)
        with record_attention(m) as rec:
            explicit = m(x, layout)
        unmasked = m(x, TokenLayout((3, 4)))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert (rec.last()[""][~keep[:, None].expand(-1, 2, -1, -1)] == 0).all()
    assert (fused - unmasked).abs().max() > 1e-3  # the mask did something


def test_cores_without_bias_and_mismatched_groupings_refuse_a_mask():
    x = torch.randn(1, 16, 16)
    mask = torch.ones(1, 16, dtype=torch.bool)
    lin = MultiHeadAttention(16, 2, core="focused_linear", layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="core 'focused_linear' cannot take the layout's attention mask"):
        lin(x, TokenLayout((4, 4), mask=mask))
    win = MultiHeadAttention(16, 2, grouping="window", window_size=2, layout=TokenLayout((4, 4)))
    with pytest.raises(ValueError, match="does not fit grouping 'window'"):
        win(x, TokenLayout((4, 4), mask=mask))
    with pytest.raises(ValueError, match="focused_linear"):
        NaViT(img_size=16, patch_size=4, **SMALL, core="focused_linear")
    with pytest.raises(ValueError, match="pooling"):
        NaViT(img_size=16, patch_size=4, **SMALL, mixer="pooling")


# -- the packer -------------------------------------------------------------------------------------------------------
def test_first_fit_never_overflows_places_each_item_once_and_follows_the_rule():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(1, 65, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        bins = first_fit(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
        free, where = [], {i: k for k, b in enumerate(bins) for i in b}  # replay: the first bin with room, in order
        for i, n in enumerate(lengths):
            want = next((k for k, f in enumerate(free) if n <= f), len(free))
            assert where[i] == want
            free.append(64) if want == len(free) else None
            free[want] -= n
    with pytest.raises(ValueError, match="item 1 has 70 tokens"):
        first_fit([3, 70], 64)


def test_pack_images_places_every_patch_once_with_its_position():
    imgs = _images()
    batch = pack_images(imgs, 4, 128)
    s, length, dim = batch.patches.shape
    assert length == 128 and dim == 48 and batch.num_images == len(imgs)
    for i, (img, (h, w)) in enumerate(zip(imgs, batch.grids)):
        seq, slot = batch.index[i].tolist()
        sel = batch.image_ids[seq] == slot
        assert int(sel.sum()) == h * w == (img.shape[1] // 4) * (img.shape[2] // 4)
        pos = batch.positions[seq, sel]
        for (r, c), patch in zip(pos.tolist(), batch.patches[seq, sel]):  # the patch pixels at that position
            want = img[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(1, 2, 0).reshape(-1)
            assert torch.equal(patch, want)
    mask = batch.attention_mask()
    assert torch.equal(mask, batch.image_ids[:, :, None] == batch.image_ids[:, None, :])
    with pytest.raises(ValueError, match="divisible by the patch size 4"):
        pack_images([torch.randn(3, 6, 8)], 4, 128)
    with pytest.raises(ValueError, match="1 to 16"):
        pack_images([torch.randn(3, 20, 20)], 4, 16)


def test_token_drop_keeps_the_given_share_of_each_image():
    imgs = _images([(32, 32), (16, 8)])
    batch = pack_images(imgs, 4, 128, token_drop=lambda h, w: 0.5 if h == 32 else 0.25)
    counts = [(batch.image_ids[s] == k).sum().item() for s, k in batch.index.tolist()]
    assert counts == [32, 6]  # round(64 * 0.5), round(8 * 0.75)


# -- the model --------------------------------------------------------------------------------------------------------
def test_packed_forward_equals_each_image_alone():
    model = _navit().eval()
    imgs = _images()
    with torch.no_grad():
        packed = model(imgs)
        alone = torch.cat([model(img[None]) for img in imgs])
    assert packed.shape == (len(imgs), 10)
    assert len(model.pack(imgs).patches) < len(imgs)  # several images did share a sequence
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_padding_tokens_do_not_change_outputs():
    model = _navit().eval()
    imgs = _images()
    a = pack_images(imgs, 4, 128)
    b = pack_images(imgs, 4, 400)  # other packing, far more padding
    b.patches[b.image_ids < 0] = 1e3 * torch.randn(int((b.image_ids < 0).sum()), 48)  # garbage in the padding
    with torch.no_grad():
        torch.testing.assert_close(model(a), model(b), atol=1e-5, rtol=1e-5)


def test_masked_keys_get_exactly_zero_attention_in_every_layer_and_the_pool():
    model = _navit().eval()
    batch = model.pack(_images())
    with record_attention(model) as rec, torch.no_grad():
        model(batch)
    maps = rec.last()
    assert len(maps) == 3  # two blocks and the pool
    mask = batch.attention_mask()[:, None]
    for name in ("blocks.0.attn", "blocks.1.attn"):
        assert (maps[name][~mask.expand_as(maps[name])] == 0).all()
    pool = maps["attn_pool"]  # (S, heads, slots, slots + L): queries see their image's tokens only
    slots = batch.num_slots
    assert (pool[..., :slots] == 0).all()
    own = batch.image_ids[:, None, None, :] == torch.arange(slots)[None, None, :, None]
    present = own.any(-1, keepdim=True)
    assert (pool[..., slots:][present.expand_as(own) & ~own.expand(-1, 2, -1, -1)] == 0).all()


def test_position_embeddings_are_the_factorised_row_plus_column_tables():
    model = _navit().eval()
    img = torch.randn(1, 3, 8, 12)
    tokens, layout = model.forward_stem(img)
    e = model.embeds
    patches = img.unfold(2, 4, 4).unfold(3, 4, 4)  # (1, 3, 2, 3, 4, 4)
    for r in range(2):
        for c in range(3):
            flat = patches[0, :, r, c].permute(1, 2, 0).reshape(-1)
            want = e.proj(flat) + e.pos_embed_y[0, r] + e.pos_embed_x[0, c]
            torch.testing.assert_close(tokens[0, r * 3 + c], want)
    assert layout.grid == (2, 3) and layout.mask is None
    with pytest.raises(ValueError, match="exceeds the position tables"):
        model(torch.randn(1, 3, 68, 4))


def test_timm_naflexvit_parity_with_every_parameter_randomised():
    from parity import randomize_
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    cfg = NaFlexVitCfg(patch_size=4, pos_embed="factorized", pos_embed_grid_size=(3, 5), global_pool="map", **SMALL)
    ref = randomize_(NaFlexVit(cfg, num_classes=10).eval(), 0)
    ours = vitlab.create_model("navit_tiny_patch4", max_img_size=(12, 20), **SMALL).eval()
    assert set(ref.state_dict()) == set(ours.state_dict())  # timm's names
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours([x[1], x[0]]), want.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", ["small", "base"])
def test_parameter_counts_equal_timm_naflexvit_of_the_same_configuration(size):
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    dims = dict(small=(384, 6), base=(768, 12))[size]
    with torch.device("meta"):
        ours = vitlab.create_model(f"navit_{size}_patch16")
        ref = NaFlexVit(NaFlexVitCfg(patch_size=16, embed_dim=dims[0], depth=12, num_heads=dims[1],
                                     pos_embed="factorized", pos_embed_grid_size=(32, 32), global_pool="map"))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    # by hand: timm's ViT-S/16 / ViT-B/16 (22,050,664 / 86,567,656) less the class token and the 197-row table,
    # plus two 32-row tables and the MAP head: q, kv, proj, MLP (ratio 4), its norm and the latent
    d = dims[0]
    vit = dict(small=22_050_664, base=86_567_656)[size]
    map_head = (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + (8 * d * d + 5 * d) + 2 * d + d
    assert n == vit - d - 197 * d + 64 * d + map_head


def test_forward_backward_finite_with_token_drop_and_every_parameter_learns():
    model = _navit(token_drop=0.3, drop_path_rate=0.1).train()
    imgs = _images()
    out = model(imgs)
    assert out.shape == (len(imgs), 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    batch = torch.randn(2, 3, 16, 16)  # a plain batch in training is packed too, to drop tokens
    assert model._as_input(batch).patches.shape[1] == 128 and model(batch).shape == (2, 10)


def test_model_contract():
    from timm.optim import create_optimizer_v2

    model = _navit().eval()
    x = torch.randn(2, 3, 16, 12)
    feats = model.forward_features(x)
    assert feats.shape == (2, 12, 32)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    final, inter = model.forward_intermediates(x, indices=[0, 1])
    assert [t.shape for t in inter] == [(2, 32, 4, 3)] * 2
    torch.testing.assert_close(final, feats)
    with record_attention(model) as rec, torch.no_grad():
        model(x)
    assert set(rec.last()) == {"blocks.0.attn", "blocks.1.attn", "attn_pool"}
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.default_cfg is model.pretrained_cfg
    assert {"embeds.pos_embed_y", "embeds.pos_embed_x", "attn_pool.latent"} <= model.no_weight_decay()
    create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)  # group_matcher: stem, blocks, norm
    model.reset_classifier(3)
    assert model(_images()).shape == (len(SIZES), 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)


# -- the collate ----------------------------------------------------------------------------------------------------
def test_collate_on_a_folder_of_mixed_size_images(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    g = torch.Generator().manual_seed(0)
    sizes = [(18, 30), (40, 12), (9, 9), (100, 20)]
    for i, (h, w) in enumerate(sizes):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(px).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    ds = ImageFolder(str(tmp_path), transform=native_size_transform(4, (0.5,) * 3, (0.25,) * 3, max_size=64))
    shapes = sorted(tuple(ds[i][0].shape[1:]) for i in range(len(ds)))
    assert shapes == sorted([(16, 28), (40, 12), (8, 8), (64, 12)])  # cropped to the patch, the big one shrunk
    loader = packing_loader(ds, PackingCollate(4, 128), batch_size=4)
    batch, labels = next(iter(loader))
    assert torch.equal(labels, torch.tensor([ds[i][1] for i in range(4)]))
    model = _navit().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model([ds[i][0] for i in range(4)]), atol=1e-5, rtol=1e-5)
    assert math.isclose(float((batch.image_ids >= 0).float().sum()), sum(h * w / 16 for h, w in shapes))
