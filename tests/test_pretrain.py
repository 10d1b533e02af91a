"""MAE and SimMIM (vitlab.pretrain) against the references' formulas."""
import math

import numpy as np
import pytest
import torch

import vitlab
from vitlab.errors import UserError
from vitlab.pretrain.mae import MAE, mae_loss, pixel_target
from vitlab.pretrain.masking import mask_patch_size, patchify, random_masking, restore_order, simmim_mask, unpatchify
from vitlab.pretrain.simmim import SimMIM, simmim_loss

VIT = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=0, in_chans=1)
SWIN = ("swin_tiny_patch4_window7_224", dict(img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                              window_size=2, num_classes=0, drop_path_rate=0.0))
PVT2 = ("pvt_v2_b0", dict(img_size=32, depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1),
                          num_classes=0))


def _vit(**kw):
    return vitlab.create_model("vit_tiny_patch16_224", **{**VIT, **kw})


@pytest.mark.parametrize("length,ratio", [(49, 0.75), (196, 0.75), (64, 0.6), (10, 0.5), (7, 0.8)])
def test_masking_keeps_the_reference_count_and_differs_per_sample(length, ratio):
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(8, length, ratio)
    keep = int(length * (1 - ratio))
    assert ids_keep.shape == (8, keep)
    assert torch.equal(mask.sum(1), torch.full((8,), float(length - keep)))
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)  # the kept tokens are the unmasked ones
    assert len({tuple(r.tolist()) for r in mask}) > 1  # per-sample, not one mask for the batch


def test_unshuffle_inverts_the_shuffle():
    torch.manual_seed(1)
    x = torch.randn(3, 20, 5)
    _, _, ids_restore = random_masking(3, 20, 0.75)
    ids_shuffle = ids_restore.argsort(dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 5))
    assert not torch.equal(shuffled, x)
    assert torch.equal(restore_order(shuffled, ids_restore), x)


def test_patchify_layout_and_norm_pix_target_by_hand():
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4) ** 1.5
    rows = patchify(img, 2)
    a = img[0].numpy()
    first = np.stack([a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1]])  # (p, p, C) order of MAE's patchify
    assert np.allclose(rows[0, 0].numpy(), first.reshape(-1))
    assert torch.equal(unpatchify(rows, 2, (2, 2), 2), img)
    target = pixel_target(img, 2, norm_pix_loss=True)
    for i in range(4):
        v = rows[0, i].double().numpy()
        hand = (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-6)  # unbiased variance, as torch.var
        assert np.allclose(target[0, i].numpy(), hand, atol=1e-5)
    assert torch.equal(pixel_target(img, 2, norm_pix_loss=False), rows)


def test_mae_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    mae = MAE(_vit(), "vit", 16, 1, mask_ratio=0.75)
    imgs = torch.randn(4, 1, 16, 16)
    loss = mae(imgs)
    pred, target, mask = mae.last["pred"].clone(), mae.last["target"].clone(), mae.last["mask"]
    assert torch.allclose(loss, mae_loss(pred, target, mask))
    visible, masked = mask == 0, mask == 1
    changed = pred.clone()
    changed[visible] += 10.0
    assert torch.equal(mae_loss(changed, target, mask), mae_loss(pred, target, mask))
    changed = pred.clone()
    changed[masked] += 10.0
    assert not torch.allclose(mae_loss(changed, target, mask), mae_loss(pred, target, mask))
    target.requires_grad_(True)
    mae_loss(pred, target, mask).backward()
    assert torch.all(target.grad[visible] == 0) and torch.any(target.grad[masked] != 0)


def test_mae_encoder_sees_only_the_kept_tokens():
    torch.manual_seed(0)
    mae = MAE(_vit(), "vit", 16, 1, mask_ratio=0.75)
    latent, mask, _ = mae.encode(torch.randn(2, 1, 16, 16))
    assert latent.shape == (2, 1 + int(16 * 0.25), 32)  # class token + int(L * (1 - ratio)) tokens
    loss = mae(torch.randn(2, 1, 16, 16))
    loss.backward()
    assert all(p.grad is not None for p in mae.encoder.blocks.parameters())


@pytest.mark.parametrize("spec", [SWIN, PVT2, ("vit_tiny_patch16_224", dict(VIT, embed="conv", in_chans=3))],
                         ids=["swin", "pvt_v2", "vit_conv_stem"])
def test_mae_refuses_encoders_that_cannot_drop_tokens(spec):
    name, kw = spec
    model = vitlab.create_model(name, **kw)
    with pytest.raises(UserError, match="--method simmim") as err:
        MAE(model, name, kw["img_size"], model.in_chans)
    assert "\n" not in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("img,stride,expected", [(28, 4, 4), (32, 4, 4), (64, 4, 8), (192, 4, 32), (224, 16, 32),
                                                  (224, 14, 28)])
def test_simmim_mask_patch_rule(img, stride, expected):
    assert mask_patch_size(img, stride) == expected
    with pytest.raises(UserError, match="--mask-patch 6"):
        mask_patch_size(img, stride, 6)


def test_simmim_mask_aligns_to_the_mask_grid():
    torch.manual_seed(0)
    m = simmim_mask(5, 64, 16, 4, 0.6)  # a 4x4 grid of 16 px cells, each 4x4 tokens
    assert m.shape == (5, 16, 16)
    cells = m.reshape(5, 4, 4, 4, 4)
    assert torch.all(cells.amax(dim=(2, 4)) == cells.amin(dim=(2, 4)))  # constant inside every cell
    assert torch.equal(cells[:, :, 0, :, 0].sum(dim=(1, 2)), torch.full((5,), float(math.ceil(16 * 0.6))))
    assert len({tuple(r.flatten().tolist()) for r in m}) > 1


def test_simmim_loss_is_l1_on_masked_pixels():
    torch.manual_seed(0)
    x, rec = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    hand = ((x - rec).abs() * mask).sum() / (mask.sum() + 1e-5) / 3
    assert torch.allclose(simmim_loss(x, rec, mask), hand)
    rec2 = rec + 5.0 * (1 - mask)
    assert torch.allclose(simmim_loss(x, rec2, mask), simmim_loss(x, rec, mask))
    assert not torch.allclose(simmim_loss(x, rec + 5.0 * mask, mask), simmim_loss(x, rec, mask))


@pytest.mark.parametrize("spec", [SWIN, PVT2, ("vit_tiny_patch16_224", dict(VIT, in_chans=3, img_size=32))],
                         ids=["swin", "pvt_v2", "vit"])
def test_simmim_runs_and_masked_pixels_never_reach_the_encoder(spec):
    name, kw = spec
    torch.manual_seed(0)
    sim = SimMIM(vitlab.create_model(name, **kw), name, 32, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = sim.token_mask(2)
    rec = sim.reconstruct(x, mask)
    assert rec.shape == x.shape
    noise = torch.randn_like(x) * sim.pixel_mask(mask)  # change only the masked pixels
    assert torch.allclose(sim.reconstruct(x + noise, mask), rec, atol=1e-5)  # also through PVTv2's 7x7 stem
    unmasked = torch.randn_like(x) * (1 - sim.pixel_mask(mask))
    assert not torch.allclose(sim.reconstruct(x + unmasked, mask), rec, atol=1e-5)
    loss = sim.train()(x)
    loss.backward()
    assert torch.isfinite(loss) and sim.mask_token.grad is not None and sim.mask_token.grad.abs().sum() > 0


def test_bad_mask_ratio_is_a_one_line_error():
    with pytest.raises(UserError, match=r"--mask-ratio 1\.5"):
        MAE(_vit(), "vit", 16, 1, mask_ratio=1.5)
    with pytest.raises(UserError, match=r"--mask-ratio 0"):
        SimMIM(_vit(), "vit", 16, 1, mask_ratio=0)


def test_decoder_head_width_is_its_own_option_from_the_command_line_to_the_attention():
    """``--decoder-head-dim`` (vit-pytorch's ``decoder_dim_head``): the decoder attention is heads x head_dim wide
    inside a narrower decoder, projected back to the decoder width; without it the width is split into the heads."""
    import argparse

    from vitlab.pretrain.cli import add_arguments, config_from_args
    from vitlab.pretrain.methods import build_method

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--method", "mae", "--model", "vit_tiny_patch16_224", "--decoder-dim", "32",
                         "--decoder-heads", "4", "--decoder-head-dim", "16", "--decoder-depth", "1",
                         "--model-kwargs", '{"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}'])
    cfg = config_from_args(args).resolved()
    assert cfg.decoder_head_dim == 16
    settings = dict(img_size=16, in_chans=1, num_classes=10)
    mae, _ = build_method(cfg, settings, 10)
    attn = mae.decoder.decoder_blocks[0].attn
    assert tuple(attn.qkv.weight.shape) == (3 * 4 * 16, 32) and tuple(attn.proj.weight.shape) == (32, 64)
    plain = MAE(_vit(), "vit_tiny_patch16_224", 16, 1, decoder_dim=32, decoder_heads=4, decoder_depth=1)
    assert tuple(plain.decoder.decoder_blocks[0].attn.qkv.weight.shape) == (3 * 32, 32)
    with pytest.raises(UserError, match="--decoder-head-dim 0: expected a positive width per head"):
        MAE(_vit(), "vit_tiny_patch16_224", 16, 1, decoder_dim=32, decoder_heads=4, decoder_head_dim=0)
    with pytest.raises(UserError, match="--decoder-dim 30: expected a multiple of 4"):
        MAE(_vit(), "vit_tiny_patch16_224", 16, 1, decoder_dim=30, decoder_heads=3, decoder_head_dim=8)

