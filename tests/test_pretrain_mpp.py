"""MPP (masked patch prediction, ViT paper / vit-pytorch): targets by hand, the 80/10/10 corruption,
a loss that counts the selected patches only, the refusal of leaking stems and a tiny run."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.engine.checkpoint import load_checkpoint
from vitlab.errors import UserError
from vitlab.pretrain.mpp import MPP, mpp_corrupt, mpp_loss, mpp_targets

VIT = dict(img_size=8, patch_size=4, depth=1, embed_dim=16, num_heads=2, num_classes=0, embed="patch")


def test_targets_are_the_quantised_mean_colour_by_hand():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 3, 8, 8, generator=g)
    raw[0, :, :4, :4] = 1.0  # a white patch: the top bin of every channel, class 511
    raw[1, :, :4, :4] = 0.0
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    imgs = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    target = mpp_targets(imgs, 4, mean, std, bits=3)
    assert target.shape == (2, 4)
    for b in range(2):
        for i, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            label = 0
            for ch in range(3):
                m = float(raw[b, ch, r:r + 4, c:c + 4].double().mean())
                label += min(int(math.floor(m * 8)), 7) * 8 ** ch
            assert int(target[b, i]) == label, (b, i)
    assert int(target[0, 0]) == 511 and int(target[1, 0]) == 0
    grey = mpp_targets(imgs[:, :1], 4, mean[:1], std[:1], bits=3)
    assert int(grey.max()) < 8  # one channel: 8 classes


def test_corruption_counts_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(400, 16, 5, generator=g)
    mask = torch.full((1, 1, 5), 7.0)
    out, selected, kind = mpp_corrupt(patches, 0.5, mask, generator=g)
    assert torch.equal(selected.sum(1), torch.full((400,), 8))  # ceil(16 * 0.5) per image
    assert torch.equal(out[~selected], patches[~selected]) and torch.all(kind[~selected] == 0)
    assert torch.all(out[kind == 1] == 7.0)
    assert torch.equal(out[kind == 3], patches[kind == 3])
    for b, i in (kind == 2).nonzero().tolist():  # a random patch is another patch of the same image
        assert any(torch.equal(out[b, i], patches[b, j]) for j in range(16))
    n = float(selected.sum())
    shares = [float((kind == k).sum()) / n for k in (1, 2, 3)]
    assert shares[0] == pytest.approx(0.8, abs=0.03) and shares[1] == pytest.approx(0.1, abs=0.02)
    assert shares[2] == pytest.approx(0.1, abs=0.02)


def test_loss_counts_only_the_selected_patches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 8, (3, 6), generator=g)
    selected = torch.rand(3, 6, generator=g) < 0.5
    loss = mpp_loss(logits, target, selected)
    hand = sum(-F.log_softmax(logits[b, i], -1)[target[b, i]] for b, i in selected.nonzero().tolist())
    assert float(loss.detach()) == pytest.approx(float(hand.detach()) / int(selected.sum()), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~selected] == 0) and torch.all(logits.grad[selected].abs().sum(-1) > 0)


def test_mpp_model_trains_only_on_selected_patches_and_refuses_leaking_stems():
    torch.manual_seed(0)
    enc = vitlab.create_model("vit_tiny_patch16_224", in_chans=1, **VIT)
    mpp = MPP(enc, "vit", 8, 1, [0.5], [0.25], mask_ratio=0.5)
    assert mpp.head.out_features == 8
    imgs = torch.randn(4, 1, 8, 8)
    loss = mpp(imgs)
    last = mpp.last
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(last["logits"][last["selected"]],
                                                              last["target"][last["selected"]])), rel=1e-6)
    assert torch.equal(last["selected"].sum(1), torch.full((4,), 2))
    conv = vitlab.create_model("vit_tiny_patch16_224", in_chans=1, **dict(VIT, embed="conv"))
    with pytest.raises(UserError, match="embed=patch"):
        MPP(conv, "vit_conv", 8, 1, [0.5], [0.25])
    with pytest.raises(UserError, match="--mask-ratio 1.5"):
        MPP(enc, "vit", 8, 1, [0.5], [0.25], mask_ratio=1.5)


def test_tiny_mpp_run(tmp_path):
    from vitlab.cli import main

    out = str(tmp_path / "mpp")
    assert main(["pretrain", "--method", "mpp", "--epochs", "1", "--max-steps", "2", "--batch-size", "16",
                 "--eval", "none", "--out", out, "--no-progress", "--workers", "0", "--log-interval", "0"]) == 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))
    assert ckpt["method"] == "mpp" and ckpt["step"] == 2 and "head.weight" not in ckpt["model"]
    assert "mask_patch" in ckpt["method_state"] and ckpt["method_state"]["head.weight"].shape[0] == 8
