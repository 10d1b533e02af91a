"""MP3 (masked position prediction, Zhai et al., ICML 2022): keys hidden by the layout's mask, no position code,
a position target per patch, refusals, and a tiny run that `vitlab train --pretrained` fine-tunes."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.engine.checkpoint import load_checkpoint
from vitlab.errors import UserError
from vitlab.layers import record_attention
from vitlab.pretrain.mp3 import MP3, context_mask

VIT = dict(img_size=16, patch_size=4, depth=2, embed_dim=16, num_heads=2, num_classes=0, embed="patch")


def _mp3(**kw):
    torch.manual_seed(0)
    enc = vitlab.create_model("vit_tiny_patch16_224", in_chans=1, **dict(VIT, **kw))
    return MP3(enc, "vit", 16, 1, mask_ratio=0.75)


def test_context_mask_keeps_the_prefix_and_the_reference_count():
    torch.manual_seed(0)
    m = context_mask(5, 16, 0.75, num_prefix=1)
    assert m.shape == (5, 17) and m[:, 0].all() and torch.equal(m[:, 1:].sum(1), torch.full((5,), 4))
    assert len({tuple(r.tolist()) for r in m}) > 1  # drawn per image


def test_queries_attend_only_to_the_context_and_the_table_is_zero_and_frozen():
    mp3 = _mp3().eval()
    assert mp3.encoder.pos_embed.abs().max() == 0 and not mp3.encoder.pos_embed.requires_grad
    imgs = torch.randn(3, 1, 16, 16)
    torch.manual_seed(1)
    with record_attention(mp3.encoder) as rec, torch.no_grad():
        _, keys = mp3.logits(imgs)
    probs = rec.last()
    assert len(probs) == 2
    for p in probs.values():  # (B, heads, 17, 17): every query's mass sits on the context keys
        assert torch.all(p.masked_select(~keys[:, None, None, :].expand_as(p)) == 0)
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]))


def test_without_positions_the_encoder_is_permutation_equivariant_and_the_loss_is_the_position_ce():
    """Shuffling the patches (and the context with them) shuffles the features: no position leaks in."""
    mp3 = _mp3(class_token=False, global_pool="avg").eval()
    enc = mp3.encoder
    imgs = torch.randn(2, 1, 16, 16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    patches = imgs.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 1, 16, 4, 4)
    shuffled = patches[:, :, perm].reshape(2, 1, 4, 4, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(2, 1, 16, 16)
    keys = context_mask(2, 16, 0.75)
    with torch.no_grad():
        t, lay = enc.forward_stem(imgs)
        a = enc.forward_tokens(t, lay.with_mask(keys))
        t2, lay2 = enc.forward_stem(shuffled)
        b = enc.forward_tokens(t2, lay2.with_mask(keys[:, perm]))
    torch.testing.assert_close(b, a[:, perm], atol=1e-5, rtol=1e-5)
    torch.manual_seed(4)
    loss = mp3(imgs)
    logits = mp3.last["logits"]
    want = sum(F.cross_entropy(logits[i], torch.arange(16)) for i in range(2)) / 2
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)


def test_refusals_name_the_reason():
    with pytest.raises(UserError, match="fixed position code"):
        _mp3(pos_embed="sincos")
    with pytest.raises(UserError, match="takes none"):
        _mp3(mixer="focused_linear")
    with pytest.raises(UserError, match="embed=patch"):
        _mp3(embed="conv")
    swin = vitlab.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1),
                               num_heads=(1, 1), window_size=4, num_classes=0)
    with pytest.raises(UserError, match="isotropic"):
        MP3(swin, "swin", 32, 3)


def test_tiny_mp3_run_and_fine_tune(tmp_path):
    from vitlab.cli import main

    out = str(tmp_path / "mp3")
    assert main(["pretrain", "--method", "mp3", "--epochs", "1", "--max-steps", "2", "--batch-size", "16",
                 "--eval", "none", "--out", out, "--no-progress", "--workers", "0", "--log-interval", "0"]) == 0
    ck = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))
    assert ck["method"] == "mp3" and ck["step"] == 2
    assert ck["model"]["pos_embed"].abs().max() == 0  # frozen at zero: fine-tuning adds positions from zero
    assert ck["method_state"]["head.weight"].shape[0] == 49  # the 7 x 7 positions of the default model
    ft = str(tmp_path / "ft")
    kwargs = json.dumps(ck["model_kwargs"])  # the fine-tune command the run prints
    assert main(["train", "--pretrained", os.path.join(out, "checkpoints", "last.pt"), "--model", ck["model_name"],
                 "--model-kwargs", kwargs, "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "16", "--out", ft, "--no-progress", "--workers", "0",
                 "--amp", "none"]) == 0
    tuned = load_checkpoint(os.path.join(ft, "checkpoints", "last.pt"))
    assert tuned["model"]["pos_embed"].abs().max() > 0  # the table trains again
