"""vitlab.compat.vit_pytorch's self-supervised wrappers (MAE, SimMIM, MPP, MP3, Dino): vit-pytorch's README calls
with only the import changed (at image 32, patch 8, dim 32, depth 2), each loss recomputed independently from the
recorded prediction / target / mask, the masking counts, the parameters the wrappers add vs vit-pytorch's own
wrappers (the difference written out from the two architectures), Dino's EMA teacher, and the refusals."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from vitlab.compat.vit_pytorch.dino import Dino
from vitlab.compat.vit_pytorch.mae import MAE
from vitlab.compat.vit_pytorch.mp3 import MP3, ViT as MP3ViT
from vitlab.compat.vit_pytorch.mpp import MPP
from vitlab.pretrain.mpp import mpp_corrupt
from vitlab.compat.vit_pytorch.simmim import SimMIM
from vitlab.compat.vit_pytorch.simple_vit import SimpleViT
from vitlab.compat.vit_pytorch.vit import ViT
from vitlab.layers import record_attention
from vitlab.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64)
L = 16  # patches of a 32 px image at patch 8


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _patches(img: torch.Tensor, p: int = 8) -> torch.Tensor:  # vit-pytorch's to_patch
    return rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)


def _assert_encoder_trained(encoder: nn.Module) -> None:
    """Every trainable encoder parameter but the classifier got a finite gradient, the stem and blocks non-zero."""
    for name, p in encoder.named_parameters():
        if p.requires_grad and not name.startswith("head."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(b.mlp.fc1.weight.grad.abs().sum() > 0 for b in encoder.blocks)


# -- the README calls, only the import changed (sizes shrunk) ---------------------------------------------------
def _readme_mae():
    v = ViT(**SMALL)
    mae = MAE(encoder=v, masking_ratio=0.75, decoder_dim=32, decoder_depth=2, decoder_heads=4, decoder_dim_head=8)
    return v, mae(torch.randn(8, 3, 32, 32))


def _readme_simmim():
    v = ViT(**SMALL)
    mim = SimMIM(encoder=v, masking_ratio=0.5)
    return v, mim(torch.randn(8, 3, 32, 32))


def _readme_mpp():
    model = ViT(**SMALL, dropout=0.1, emb_dropout=0.1)
    mpp_trainer = MPP(transformer=model, patch_size=8, dim=32, mask_prob=0.15, random_patch_prob=0.30,
                      replace_prob=0.50)
    return model, mpp_trainer(torch.FloatTensor(20, 3, 32, 32).uniform_(0.0, 1.0))


def _readme_mp3():
    v = MP3ViT(num_classes=10, image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, dropout=0.1)
    mp3 = MP3(vit=v, masking_ratio=0.75)
    return v, mp3(torch.randn(8, 3, 32, 32))


def _readme_dino():
    model = ViT(**SMALL)
    learner = Dino(model, image_size=32, hidden_layer="to_latent", projection_hidden_size=32, projection_layers=4,
                   num_classes_K=64, student_temp=0.9, teacher_temp=0.04, local_upper_crop_scale=0.4,
                   global_lower_crop_scale=0.5, moving_average_decay=0.9, center_moving_average_decay=0.9)
    return model, learner(torch.rand(4, 3, 32, 32))


@pytest.mark.parametrize("readme", [_readme_mae, _readme_simmim, _readme_mpp, _readme_mp3, _readme_dino])
def test_readme_call_gives_a_scalar_loss_whose_gradient_reaches_the_encoder(readme):
    encoder, loss = readme()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    _assert_encoder_trained(encoder)


# -- each loss from the recorded tensors --------------------------------------------------------------------------
def test_mae_loss_is_the_mse_over_the_removed_patches_and_the_paper_count_is_kept():
    v = ViT(**SMALL)
    mae = MAE(encoder=v, masking_ratio=0.7, decoder_dim=32, decoder_heads=4, decoder_dim_head=8)
    img = torch.randn(3, 3, 32, 32)
    loss = mae(img)
    pred, target, mask = mae.last["pred"], mae.last["target"], mae.last["mask"].bool()
    torch.testing.assert_close(target, _patches(img))  # pixels as given (vit-pytorch's target)
    removed = L - int(L * (1 - 0.7))  # the paper keeps int(L (1 - r)): 12 removed where vit-pytorch masks 11
    assert removed == 12 != int(0.7 * L) and mask.sum(1).tolist() == [removed] * 3
    assert len({tuple(r.tolist()) for r in mask}) == 3  # drawn per image
    assert float(loss.detach()) == pytest.approx(float(F.mse_loss(pred[mask], _patches(img)[mask])), rel=1e-5)


def test_simmim_loss_is_l1_over_masked_pixels_by_count_and_channels():
    v = ViT(**SMALL)
    mim = SimMIM(encoder=v, masking_ratio=0.3)
    img = torch.randn(4, 3, 32, 32)
    loss = mim(img)
    rec, m = mim.last["rec"], mim.last["pixel_mask"]
    per_patch = reduce(m, "b 1 (h p1) (w p2) -> b h w", "max", p1=8, p2=8)
    assert torch.equal(per_patch, reduce(m, "b 1 (h p1) (w p2) -> b h w", "min", p1=8, p2=8))  # whole patches
    assert per_patch.sum((1, 2)).tolist() == [math.ceil(L * 0.3)] * 4  # 5 (vit-pytorch: int(4.8) = 4)
    want = ((img - rec).abs() * m).sum() / (m.sum() * 3)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


def _mpp_targets(img: torch.Tensor, bits: int = 3, mpv: float = 1.0) -> torch.Tensor:
    """vit-pytorch's MPPLoss target: mean colour per patch, bucketised, channel 0 least significant."""
    avg = reduce(img.clamp(max=mpv), "b c (h p1) (w p2) -> b (h w) c", "mean", p1=8, p2=8)
    q = torch.bucketize(avg, torch.arange(mpv / 2 ** bits, mpv, mpv / 2 ** bits))
    return (q * (2 ** bits) ** torch.arange(img.shape[1])).sum(-1)


def test_mpp_loss_is_the_colour_cross_entropy_over_the_selected_patches():
    v = ViT(**SMALL)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    mpp = MPP(v, patch_size=8, dim=32, mask_prob=0.4, mean=mean, std=std, max_pixel_val=255.0)
    raw = torch.rand(4, 3, 32, 32) * 255
    img = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)  # the trainer un-normalises
    loss = mpp(img)
    last = mpp.last
    assert torch.equal(last["target"], _mpp_targets(raw, mpv=255.0))
    assert last["selected"].sum(1).tolist() == [math.ceil(L * 0.4)] * 4
    sel = last["selected"]
    want = F.cross_entropy(last["logits"][sel], last["target"][sel])
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_mpp_corruption_has_vit_pytorchs_shares_and_reaches_the_encoder():
    patches, mask_patch = torch.randn(64, L, 12), torch.randn(1, 1, 12)
    out, selected, kind = mpp_corrupt(patches, 0.5, mask_patch, replace_prob=0.5, random_prob=0.3)
    assert selected.sum(1).tolist() == [8] * 64 and torch.equal(kind > 0, selected)
    assert torch.equal(out[kind == 1], mask_patch[0].expand(int((kind == 1).sum()), -1))
    assert torch.equal(out[(kind == 0) | (kind == 3)], patches[(kind == 0) | (kind == 3)])
    b, n = torch.nonzero(kind == 2, as_tuple=True)  # a random patch comes from the same image
    assert all((patches[i] == out[i, j]).all(-1).any() for i, j in zip(b.tolist(), n.tolist()))
    shares = [float((kind == k).sum()) / float(selected.sum()) for k in (1, 2, 3)]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.08)
    # all selected patches replaced by the mask patch: their pixels no longer reach the logits
    mpp = MPP(ViT(**SMALL), 8, 32, mask_prob=0.5, replace_prob=1.0, random_patch_prob=0.0).eval()
    img = torch.rand(2, 3, 32, 32)
    torch.manual_seed(5)
    logits, selected, _ = mpp.logits(img)
    other = _patches(img).masked_fill(selected.unsqueeze(-1), 0.7)
    torch.manual_seed(5)
    logits2, _, _ = mpp.logits(rearrange(other, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=4, p1=8, p2=8))
    torch.testing.assert_close(logits2, logits)
    mpp.replace_prob = 0.0  # none replaced: the changed pixels do reach them
    torch.manual_seed(5)
    logits3, _, _ = mpp.logits(rearrange(other, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=4, p1=8, p2=8))
    assert not torch.allclose(logits3, logits)


def test_mp3_loss_is_the_position_cross_entropy_with_the_context_as_keys():
    v = MP3ViT(num_classes=10, image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64)
    mp3 = MP3(v, 0.7)
    assert v.pos_embed.abs().max() == 0 and not v.pos_embed.requires_grad  # no positions while pretraining
    img = torch.randn(3, 3, 32, 32)
    with record_attention(v) as rec:
        loss = mp3(img)
    keys = mp3.last["keys"]
    assert keys.sum(1).tolist() == [L - int(0.7 * L)] * 3  # as vit-pytorch: int(L r) patches hidden
    for p in rec.last().values():  # hidden keys get no attention in any layer
        assert torch.all(p.masked_select(~keys[:, None, None, :].expand_as(p)) == 0)
    want = F.cross_entropy(mp3.last["logits"].reshape(3 * L, L), torch.arange(L).repeat(3))
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert v(img).shape == (3, 10) and len(v.forward_intermediates(img, intermediates_only=True)) == 2


# -- Dino -----------------------------------------------------------------------------------------------------------
def test_dino_teacher_moves_by_the_ema_formula():
    model = ViT(**SMALL)
    learner = Dino(model, image_size=32, projection_hidden_size=32, num_classes_K=64, moving_average_decay=0.8)
    # a fixed-size net: 2 local crops resized to the net's size, as vit-pytorch's
    assert (learner.local_crops, learner.local_size) == (2, 32) and learner.net is model
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    loss = learner(torch.rand(4, 3, 32, 32))
    assert [tuple(c.shape) for c in learner.last["crops"]] == [(4, 3, 32, 32)] * 4
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in learner.teacher.parameters())
    before = [p.detach().clone() for p in learner.teacher.parameters()]
    student = [p.detach().clone() for p in learner.student.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, student))
    learner.update_moving_average()
    for t, b, s in zip(learner.teacher.parameters(), before, student):
        torch.testing.assert_close(t, 0.8 * b + 0.2 * s)
    learner.reset_moving_average()
    assert all(torch.equal(t, s) for t, s in zip(learner.teacher.parameters(), learner.student.parameters()))


def test_dino_loss_and_centre_by_hand_with_local_crops():
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                            dynamic_img_size=True)
    learner = Dino(net, image_size=32, projection_hidden_size=32, num_classes_K=64, student_temp=0.2,
                   teacher_temp=0.05, center_moving_average_decay=0.7)
    learner.loss.center.normal_()  # a non-zero centre, so its use is checked
    loss = learner(torch.rand(3, 3, 32, 32))
    crops, center = learner.last["crops"], learner.last["center"]
    assert [tuple(c.shape[-2:]) for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 2  # 2 global + 2 local
    with torch.no_grad():
        feats = [net.forward_head(net.forward_features(c), pre_logits=True) for c in crops]
        s = [learner.student.head(f) for f in feats]
        t = [learner.teacher.head(f) for f in feats[:2]]  # teacher == student before any update
    terms = [-(F.softmax((t[i] - center) / 0.05, -1) * F.log_softmax(s[v] / 0.2, -1)).sum(-1).mean()
             for i in range(2) for v in range(4) if v != i]
    assert float(loss.detach()) == pytest.approx(float(sum(terms) / 6), rel=1e-5)
    torch.testing.assert_close(learner.loss.center, 0.7 * center + 0.3 * torch.cat(t).mean(0, keepdim=True))
    proj, emb = learner(crops[0], return_embedding=True)
    torch.testing.assert_close(emb, feats[0])
    torch.testing.assert_close(proj, s[0][:3])


# -- parameters the wrappers add, vs vit-pytorch's wrappers ---------------------------------------------------------
vit_pytorch = pytest.importorskip("vit_pytorch")


def test_added_parameters_match_vit_pytorchs_wrappers():
    from vit_pytorch import Dino as VPDino, MAE as VPMAE, ViT as VPViT
    from vit_pytorch.mp3 import MP3 as VPMP3, ViT as VPMP3ViT
    from vit_pytorch.mpp import MPP as VPMPP
    from vit_pytorch.simmim import SimMIM as VPSimMIM

    d = 32
    pairs = [  # (ours, vit-pytorch's, copies of the backbone inside, ours minus vit-pytorch's)
        # decoder: Linear embedding at equal widths too, qkv biases, fixed sin-cos positions (vp: a learned table of
        # the encoder's L + 1 rows, the class row unused)
        (lambda v: MAE(encoder=v, decoder_dim=d, decoder_depth=2, decoder_heads=4, decoder_dim_head=8),
         lambda v: VPMAE(encoder=v, decoder_dim=d, decoder_depth=2, decoder_heads=4, decoder_dim_head=8), 1,
         (d * d + d) + 2 * 3 * d - (L + 1) * d),
        # vit-pytorch's defaults, 8 heads of 64: the attention is 512 wide inside a 32-wide decoder (qkv biases 3 x 512)
        (lambda v: MAE(encoder=v, decoder_dim=d), lambda v: VPMAE(encoder=v, decoder_dim=d), 1,
         (d * d + d) + 3 * 8 * 64 - (L + 1) * d),
        (lambda v: SimMIM(encoder=v), lambda v: VPSimMIM(encoder=v), 1, 0),  # mask token + one linear map
        (lambda v: MPP(v, 8, d), lambda v: VPMPP(v, 8, d), 1, 0),  # mask patch + colour head
        (lambda v: Dino(v, 32, projection_hidden_size=d, num_classes_K=64),  # student + teacher: g (K) vs bias (K)
         lambda v: VPDino(v, 32, projection_hidden_size=d, num_classes_K=64), 2, 0),
    ]
    for ours, theirs, copies, delta in pairs:
        v, vp = ViT(**SMALL), VPViT(**SMALL)
        assert (_count(ours(v)) - copies * _count(v)) - (_count(theirs(vp)) - copies * _count(vp)) == delta
    v, vp = MP3ViT(**SMALL), VPMP3ViT(**SMALL)
    assert (_count(MP3(v, 0.75)) - _count(v)) - (_count(VPMP3(vp, 0.75)) - _count(vp)) == -2 * d  # no head LN


def test_mp3_vit_parameters_vs_vit_pytorch_at_the_readme_size():
    from vit_pytorch.mp3 import ViT as VPMP3ViT

    kw = dict(num_classes=1000, image_size=256, patch_size=8, dim=1024, depth=6, heads=8, mlp_dim=2048,
              dropout=0.1)
    with torch.device("meta"):
        ours, theirs = MP3ViT(**kw), VPMP3ViT(**kw)
    # + learned table (32 x 32 patches), + qkv biases (8 heads x 64); - LayerNorms around the patch projection
    assert _count(ours) - _count(theirs) == 1024 * 1024 + 6 * 3 * 8 * 64 - (2 * 3 * 8 * 8 + 2 * 1024)


# -- refusals -------------------------------------------------------------------------------------------------------
REFUSALS = [
    (lambda: MAE(encoder=ViT(**SMALL), decoder_dim=32, decoder_dim_head=0), "decoder_dim_head=0"),
    (lambda: MAE(encoder=ViT(**SMALL), decoder_dim=32, decoder_heads=4, decoder_dim_head=8, masking_ratio=1.0),
     "masking_ratio=1.0"),
    (lambda: MAE(encoder=nn.Linear(3, 3), decoder_dim=32), "encoder='Linear'"),
    (lambda: SimMIM(encoder=ViT(**SMALL), masking_ratio=0.0), "masking_ratio=0.0"),
    (lambda: MPP(ViT(**SMALL), 16, 32), "patch_size=16"),
    (lambda: MPP(ViT(**SMALL), 8, 32, replace_prob=0.8, random_patch_prob=0.3), "random_patch_prob=0.3"),
    (lambda: MPP(ViT(**SMALL), 8, 32, mean=(0.5,) * 3), "mean"),
    (lambda: MP3(SimpleViT(**SMALL), 0.75), "fixed position code"),
    (lambda: Dino(ViT(**SMALL), 32, projection_layers=3), "projection_layers=3"),
    (lambda: Dino(ViT(**SMALL), 32, hidden_layer=-1), "hidden_layer=-1"),
    (lambda: Dino(ViT(**SMALL), 32, augment_fn=nn.Identity()), "augment_fn"),
    (lambda: Dino(ViT(**SMALL), 64), "image_size=64"),
]


@pytest.mark.parametrize("build,match", REFUSALS)
def test_what_vitlab_cannot_honour_is_one_value_error(build, match):
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert "\n" not in str(info.value)
