"""vitlab.compat.vit_pytorch: vit-pytorch's README examples with only the import changed.

Each README configuration is built side by side with vit-pytorch's own class (on the meta device: shapes and
parameter counts without the memory), the output shapes compared, and the parameter counts compared **exactly**:
equal where the architectures are the same, else differing by the amount the class docstring explains (the
formula is written out here from the two architectures, not read from either model).  Real tensors run at a
small size."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

vit_pytorch = pytest.importorskip("vit_pytorch")

from vitlab.layers import record_attention  # noqa: E402


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pair(mod: str, cls: str, kw, vp_device: str = "meta"):
    """(vit-pytorch's model, vitlab's compat model), both built from ``kw``."""
    vp_cls = getattr(importlib.import_module(f"vit_pytorch.{mod}"), cls)
    vl_cls = getattr(importlib.import_module(f"vitlab.compat.vit_pytorch.{mod}"), cls)
    with torch.device(vp_device):
        ref = vp_cls(**kw).eval()
    with torch.device("meta"):
        ours = vl_cls(**kw).eval()
    return ref, ours


def _vit_delta(dim, depth, heads, patch_dim, dim_head=64, patch_norms=True, proj_bias=False):
    """vitlab's ViT minus vit-pytorch's: qkv biases in every block, no LayerNorms around the patch projection
    (``patch_norms``), output-projection biases where vit-pytorch has none (``proj_bias``)."""
    return depth * (3 * heads * dim_head + dim * proj_bias) - (2 * patch_dim + 2 * dim) * patch_norms


R = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048, dropout=0.1,
         emb_dropout=0.1)
R16 = dict(R, patch_size=16, heads=8)
PD = 3 * 32 * 32  # patch_dim of the 32-pixel README examples
VIDEO = dict(image_size=128, frames=16, image_patch_size=16, frame_patch_size=2, num_classes=1000, dim=1024,
             heads=8, mlp_dim=2048)

# (module, class, README arguments, input shape, vitlab's parameters minus vit-pytorch's)
README = [
    ("vit", "ViT", R, (1, 3, 256, 256), _vit_delta(1024, 6, 16, PD)),
    ("simple_vit", "SimpleViT", {k: v for k, v in R.items() if "dropout" not in k}, (1, 3, 256, 256),
     _vit_delta(1024, 6, 16, PD, proj_bias=True)),
    # re-attention: a 1x1 conv with bias (vit-pytorch: no bias); BatchNorm and LayerNorm over the heads both 2h
    ("deepvit", "DeepViT", R, (1, 3, 256, 256), _vit_delta(1024, 6, 16, PD) + 6 * 16),
    # self-attention blocks: qkv biases + talking-heads biases (2h); class attention: qkv biases, no talking heads
    ("cait", "CaiT", dict(R, depth=12, cls_depth=2, layer_dropout=0.05), (1, 3, 256, 256),
     12 * (3 * 1024 + 2 * 16) + 2 * (3 * 1024 - 2 * 16 ** 2) - (2 * PD + 2 * 1024)),
    ("distill", "DistillableViT", dict(R, heads=8), (2, 3, 256, 256),  # vit-pytorch's token + head sit in the wrapper
     _vit_delta(1024, 6, 8, PD) + 1024 + 1024 + (1024 * 1000 + 1000)),
    ("vit_for_small_dataset", "ViT", R16, (4, 3, 256, 256), 6 * (8 - 1)),  # LSA: a temperature per head
    ("parallel_vit", "ViT", dict(R16, num_parallel_branches=2), (4, 3, 256, 256),
     _vit_delta(1024, 6 * 2, 8, 0, patch_norms=False)),  # vit-pytorch's parallel ViT has no patch LayerNorms
    ("vit_with_patch_merger", "ViT", dict(R16, depth=12, patch_merge_layer=6, patch_merge_num_tokens=8),
     (4, 3, 256, 256), _vit_delta(1024, 12, 8, 3 * 16 * 16) - 1024),  # vit-pytorch's table has an unused row
    ("learnable_memory_vit", "ViT", R16, (4, 3, 256, 256), _vit_delta(1024, 6, 8, 3 * 16 * 16)),
    ("vit_3d", "ViT", dict(VIDEO, depth=6, dropout=0.1, emb_dropout=0.1), (4, 3, 16, 128, 128),
     _vit_delta(1024, 6, 8, 3 * 16 * 16 * 2)),
    ("vivit", "ViViT", dict(VIDEO, spatial_depth=6, temporal_depth=6, variant="factorized_encoder"),
     (4, 3, 16, 128, 128), _vit_delta(1024, 12, 8, 3 * 16 * 16 * 2)),
]


def _meta_forward(model: nn.Module, shape):
    with torch.device("meta"):
        return model(torch.empty(shape))


@pytest.mark.parametrize("mod,cls,kw,shape,delta", README, ids=[f"{m}.{c}" for m, c, *_ in README])
def test_readme_example_shape_and_parameter_count(mod, cls, kw, shape, delta):
    ref, ours = _pair(mod, cls, kw)
    for t in (getattr(ref, "patch_transformer", None), getattr(ref, "cls_transformer", None),
              getattr(ref, "xcit_transformer", None)):
        if t is not None:
            t.layer_dropout = 0.0  # vit-pytorch drops layers with .item() even in eval: impossible on meta
    assert _meta_forward(ours, shape).shape == _meta_forward(ref, shape).shape
    assert _count(ours) - _count(ref) == delta


def test_readme_t2t_backbone_equal_stem_and_table_differ():
    kw = dict(dim=512, image_size=224, depth=5, heads=8, mlp_dim=512, num_classes=1000,
              t2t_layers=((7, 4), (3, 2), (3, 2)))
    ref, ours = _pair("t2t", "T2TViT", kw)
    assert _meta_forward(ours, (1, 3, 224, 224)).shape == _meta_forward(ref, (1, 3, 224, 224)).shape == (1, 1000)
    # the backbone (blocks, norm, class token, head) is the same; vitlab's stem reduces to 64 channels (the paper)
    # and its sinusoid table is a buffer (vit-pytorch: a learned (N + 1) x dim table)
    assert ours.patch_embed.num_patches == 14 * 14 and ours.pos_embed.shape == (1, 14 * 14 + 1, 512)
    assert _count(ours) - _count(ref) == (_count(ours.patch_embed) - _count(ref.to_patch_embedding)
                                          - (14 * 14 + 1) * 512)
    assert ours.patch_embed.attention1.__class__.__name__ == "TokenTransformer"
    assert ours.patch_embed.project.in_features == 64 * 3 * 3  # reduced to token_dim = 64, then a 3x3 split


@pytest.mark.parametrize("which", ["CCT", "cct_14"])
def test_readme_cct_counts_equal(which):
    if which == "CCT":
        kw = dict(img_size=(224, 448), embedding_dim=384, n_conv_layers=2, kernel_size=7, stride=2, padding=3,
                  pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=14, num_heads=6,
                  mlp_ratio=3., num_classes=1000, positional_embedding="learnable")
        shape = (1, 3, 224, 448)
    else:
        kw = dict(img_size=224, n_conv_layers=1, kernel_size=7, stride=2, padding=3, pooling_kernel_size=3,
                  pooling_stride=2, pooling_padding=1, num_classes=1000, positional_embedding="learnable")
        shape = (1, 3, 224, 224)
    ref, ours = _pair("cct", which, kw, vp_device="cpu")  # vit-pytorch's CCT calls .item() while building
    assert _count(ours) == _count(ref)  # the official architecture, the same parameters
    assert ours.pos_embed.shape == ref.classifier.positional_emb.shape
    assert _meta_forward(ours, shape).shape == (1, 1000)


def test_readme_xcit_differs_by_stem_position_code_biases_and_one_norm():
    kw = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=12, cls_depth=2, heads=16,
              mlp_dim=2048, dropout=0.1, emb_dropout=0.1, layer_dropout=0.05, local_patch_kernel_size=3)
    ref, ours = _pair("xcit", "XCiT", kw)
    ref.xcit_transformer.layer_dropout = ref.cls_transformer.layer_dropout = 0.0
    assert _meta_forward(ours, (1, 3, 256, 256)).shape == _meta_forward(ref, (1, 3, 256, 256)).shape
    stem = _count(ours.patch_embed) + _count(ours.pos_embed) - _count(ref.to_patch_embedding) \
        - ref.pos_embedding.numel()
    assert _count(ours) - _count(ref) == stem + 3 * 1024 * (12 + 2) - 2 * 1024
    assert len(ours.patch_embed.proj) == 2 * 5 - 1  # log2(32) = 5 convs (+ 4 GELUs): the paper's stem


def test_readme_navit_difference_is_the_paper_parts():
    ref, ours = _pair("na_vit", "NaViT", dict(R, token_dropout_prob=0.1))
    d, m, c, inner, hd, pd = 1024, 2048, 1000, 16 * 64, 64, PD
    block = 3 * d + 3 * inner + 4 * hd - 2 * inner  # LN biases, Linear biases, LayerNorm vs RMS qk-norm
    ours_pool = d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + (2 * d * m + m + d) + (d * c + c)
    ref_pool = d + d + 2 * inner + 4 * d * inner + d + d * c  # queries, bias-free attention, LN gain, head
    assert _count(ours) - _count(ref) == 6 * block + d - (pd + d) + ours_pool - ref_pool


# -- the README calls, on real tensors at a small size ------------------------------------------------------------
SMALL = dict(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=48, dropout=0.1,
             emb_dropout=0.1)
SMALL_CASES = [
    ("vit", "ViT", SMALL, (2, 3, 32, 32)),
    ("simple_vit", "SimpleViT", {k: v for k, v in SMALL.items() if "dropout" not in k}, (2, 3, 32, 32)),
    ("deepvit", "DeepViT", SMALL, (2, 3, 32, 32)),
    ("cait", "CaiT", dict(SMALL, cls_depth=1, dim_head=16, layer_dropout=0.05), (2, 3, 32, 32)),
    ("t2t", "T2TViT", dict({k: v for k, v in SMALL.items() if k != "patch_size"}, t2t_layers=((7, 4), (3, 2))),
     (2, 3, 32, 32)),
    ("distill", "DistillableViT", SMALL, (2, 3, 32, 32)),
    ("xcit", "XCiT", dict(SMALL, cls_depth=1, dim_head=16, layer_dropout=0.05), (2, 3, 32, 32)),
    ("vit_for_small_dataset", "ViT", SMALL, (2, 3, 32, 32)),
    ("parallel_vit", "ViT", dict(SMALL, num_parallel_branches=2), (2, 3, 32, 32)),
    ("vit_with_patch_merger", "ViT", dict(SMALL, patch_merge_layer=1, patch_merge_num_tokens=4), (2, 3, 32, 32)),
    ("learnable_memory_vit", "ViT", SMALL, (2, 3, 32, 32)),
    ("vit_3d", "ViT", dict(VIDEO, image_size=32, frames=4, image_patch_size=8, num_classes=5, dim=32, depth=2,
                           heads=2, mlp_dim=48), (2, 3, 4, 32, 32)),
    ("vivit", "ViViT", dict(VIDEO, image_size=32, frames=4, image_patch_size=8, num_classes=5, dim=32, heads=2,
                            mlp_dim=48, spatial_depth=1, temporal_depth=1), (2, 3, 4, 32, 32)),
]


@pytest.mark.parametrize("mod,cls,kw,shape", SMALL_CASES, ids=[f"{m}.{c}" for m, c, *_ in SMALL_CASES])
def test_small_models_run_train_and_keep_the_contract(mod, cls, kw, shape):
    check_small_contract(mod, cls, kw, shape)


def check_small_contract(mod: str, cls: str, kw, shape) -> nn.Module:
    """vit-pytorch's ``mod.cls`` and vitlab's compat class built from ``kw``: a training step gives finite gradients
    to every parameter, eval output shapes agree, and vitlab's model contract holds; returns vitlab's model."""
    torch.manual_seed(0)
    ref = getattr(importlib.import_module(f"vit_pytorch.{mod}"), cls)(**kw).eval()
    ours = getattr(importlib.import_module(f"vitlab.compat.vit_pytorch.{mod}"), cls)(**kw)
    x = torch.randn(shape)
    y = ours.train()(x)
    y.logsumexp(-1).sum().backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and torch.isfinite(y).all()
    with torch.no_grad():
        assert ours.eval()(x).shape == ref(x).shape
        feats = ours.forward_features(x)
        torch.testing.assert_close(ours.forward_head(feats), ours(x))
        with record_attention(ours) as rec:
            ours(x)
        final, inter = ours.forward_intermediates(x, indices=1, output_fmt="NLC")
    maps = rec.last()
    assert maps and all(torch.isfinite(a).all() for a in maps.values())
    assert len(inter) == 1 and final.shape == feats.shape
    return ours


# -- argument mapping on the built model -------------------------------------------------------------------------
def test_vit_arguments_are_mapped_onto_the_model():
    from vitlab.compat.vit_pytorch import ViT

    with torch.device("meta"):
        v = ViT(**R)
        m = ViT(**dict(R, pool="mean", dim_head=32, channels=1, heads=4, mlp_dim=1000, dim=384, dropout=0.0,
                       emb_dropout=0.2))
    assert (v.embed_dim, len(v.blocks), v.blocks[0].attn.num_heads, v.blocks[0].attn.head_dim) == (1024, 6, 16, 64)
    assert v.blocks[0].mlp.fc1.out_features == 2048 and v.num_classes == 1000 and v.patch_embed.patch_size == (32, 32)
    assert v.global_pool == "token" and v.cls_token is not None
    assert (v.blocks[0].attn.attn_drop.p, v.blocks[0].attn.proj_drop.p, v.pos_drop.p, v.head_drop.p) == \
        (0.1, 0.1, 0.1, 0.0)
    assert m.global_pool == "avg" and m.cls_token is None and isinstance(m.fc_norm, nn.Identity)  # norm, then mean
    assert m.blocks[0].attn.head_dim == 32 and m.blocks[0].attn.qkv.out_features == 3 * 4 * 32
    assert m.blocks[0].mlp.fc1.out_features == 1000 and m.patch_embed.proj.in_channels == 1
    assert (m.blocks[0].attn.attn_drop.p, m.pos_drop.p) == (0.0, 0.2)


def test_family_arguments_are_mapped():
    from vitlab.compat.vit_pytorch import CaiT, CCT, XCiT
    from vitlab.compat.vit_pytorch.vit_with_patch_merger import ViT as MergerViT

    with torch.device("meta"):
        c = CaiT(**dict(R, depth=12, cls_depth=2, layer_dropout=0.05))
        x = XCiT(**dict(R, depth=12, cls_depth=2, layer_dropout=0.05))
        k = CCT(num_layers=2, num_heads=2, embedding_dim=64, img_size=32, kernel_size=3, stride=1, padding=1,
                seq_pool=False, positional_embedding="sine", dropout_rate=0.2, attention_dropout=0.3,
                stochastic_depth_rate=0.4)
        pm = MergerViT(**dict(R16, depth=4, patch_merge_layer=3, patch_merge_num_tokens=5))
    assert (len(c.blocks), len(c.blocks_token_only), c.blocks_token_only[0].mlp.fc1.out_features) == (12, 2, 2048)
    assert all(b.drop_path1.drop_prob == 0.05 for b in c.blocks)  # CaiT: the same rate in every block
    assert (len(x.blocks), len(x.cls_attn_blocks), x.blocks[0].attn.attn_drop.p, x.pos_drop.p) == (12, 2, 0.1, 0.1)
    assert k.global_pool == "token" and k.cls_token is not None and not isinstance(k.pos_embed, nn.Parameter)
    assert (k.blocks[0].attn.attn_drop.p, k.pos_drop.p, k.head_drop.p) == (0.3, 0.2, 0.0)
    assert k.blocks[-1].drop_path1.drop_prob == pytest.approx(0.4) and k.patch_embed.patch_size == (2, 2)
    assert pm.after_block == {2: "patch_merger"} and pm.patch_merger.num_tokens == 5 and pm.cls_token is None


def test_cait_layerscale_follows_the_papers_depth_rule():
    from vitlab.compat.vit_pytorch import CaiT

    for depth, eps in ((2, 0.1), (20, 1e-5), (30, 1e-6)):
        m = CaiT(image_size=16, patch_size=8, num_classes=3, dim=16, depth=depth, cls_depth=1, heads=2,
                 mlp_dim=16, dim_head=8)
        assert torch.allclose(m.blocks[0].ls1.gamma, torch.full((16,), eps))


@pytest.mark.parametrize("build,match", [
    (lambda m: m.ViT(**dict(SMALL, num_classes=0)), "num_classes=0"),
    (lambda m: m.ViT(**dict(SMALL, pool="max")), "pool='max'"),
    (lambda m: m.CaiT(**dict(SMALL, cls_depth=1)), "dim_head=64"),
    (lambda m: m.XCiT(**dict(SMALL, cls_depth=1, dim_head=16, local_patch_kernel_size=5)), "local_patch_kernel"),
    (lambda m: m.T2TViT(image_size=32, num_classes=3, dim=32, transformer=nn.Identity()), "transformer="),
    (lambda m: m.CCT(img_size=32, embedding_dim=32, num_layers=1, num_heads=2, patch_size=4), "patch_size=4"),
    (lambda m: m.DistillableViT(**dict(SMALL, pool="mean")), "pool='mean'"),
])
def test_arguments_vitlab_cannot_honour_raise(build, match):
    import vitlab.compat.vit_pytorch as compat

    with pytest.raises(ValueError, match=match):
        build(compat)


def test_mlp_dim_is_exact_for_awkward_ratios():
    from vitlab.compat.vit_pytorch import ViT

    for dim, mlp in ((384, 1000), (96, 97), (1000, 3)):  # ratios with no exact float
        with torch.device("meta"):
            m = ViT(image_size=16, patch_size=8, num_classes=2, dim=dim, depth=1, heads=1, dim_head=8, mlp_dim=mlp)
        assert m.blocks[0].mlp.fc1.out_features == mlp


# -- the wrappers of the README --------------------------------------------------------------------------------
def test_distill_wrapper_losses_match_the_formulas_and_to_vit():
    from vitlab.compat.vit_pytorch import DistillableViT, DistillWrapper
    from vitlab.compat.vit_pytorch.vit import ViT

    torch.manual_seed(0)
    v = DistillableViT(**SMALL)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    img, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    v.eval()
    feats = v.forward_features(img)
    cls, dist, t = v.head(feats[:, 0]), v.head_dist(feats[:, 1]), teacher(img)
    hard = DistillWrapper(student=v, teacher=teacher, alpha=0.3, hard=True)(img, labels)
    torch.testing.assert_close(hard, 0.7 * F.cross_entropy(cls, labels) + 0.3 * F.cross_entropy(dist, t.argmax(1)))
    tau = 3.0
    soft = DistillWrapper(student=v, teacher=teacher, temperature=tau, alpha=0.5)(img, labels)
    vp_kl = F.kl_div(F.log_softmax(dist / tau, -1), F.softmax(t / tau, -1), reduction="batchmean") * tau ** 2
    # DeiT's reference divides the KL by batch x classes, vit-pytorch's by the batch: 1 / num_classes of it
    torch.testing.assert_close(soft, 0.5 * F.cross_entropy(cls, labels) + 0.5 * vp_kl / 5)
    soft.backward()
    assert v.dist_token.grad is not None and v.head_dist.weight.grad is not None
    plain = v.to_vit()
    assert type(plain) is ViT and plain.pos_embed.shape[1] == v.pos_embed.shape[1] - 1
    torch.testing.assert_close(plain.blocks[1].attn.qkv.weight, v.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(plain.pos_embed[:, 1:], v.pos_embed[:, 2:])


def test_adapter_keeps_the_old_task_and_adds_a_new_one():
    from vitlab.compat.vit_pytorch.learnable_memory_vit import Adapter, ViT

    torch.manual_seed(0)
    v = ViT(**SMALL).eval()
    img = torch.randn(4, 3, 32, 32)
    a1, a2 = Adapter(vit=v, num_classes=2, num_memories_per_layer=5), Adapter(vit=v, num_classes=4,
                                                                           num_memories_per_layer=10)
    with torch.no_grad():
        old, new = a1.forward_both(img)
        torch.testing.assert_close(old, v(img))
        assert a1(img).shape == (4, 2) and a2(img).shape == (4, 4)
    assert a1.memory[0].tokens.shape[-2:] == (5, 32) and not any(p.requires_grad for p in v.parameters())


def test_navit_readme_inputs_give_one_prediction_per_image_independent_of_packing():
    from vitlab.compat.vit_pytorch import NaViT

    torch.manual_seed(0)
    v = NaViT(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=48, dropout=0.1,
              emb_dropout=0.1, token_dropout_prob=0.1).eval()
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 16, 16), torch.randn(3, 16, 32), torch.randn(3, 32, 16),
            torch.randn(3, 8, 32)]
    with torch.no_grad():
        grouped = v([[imgs[0], imgs[1]], [imgs[2], imgs[3]], [imgs[4]]])
        auto = v(imgs, group_images=True, group_max_seq_len=16)
        alone = torch.cat([v(img[None]) for img in imgs])  # each image as its own (B, C, H, W) batch
    assert grouped.shape == auto.shape == (5, 5)
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto, alone, atol=1e-5, rtol=1e-5)
    assert v.blocks[0].attn.q_norm.__class__ is nn.LayerNorm  # QK normalisation (the paper's)


def test_standalone_spt_and_patch_merger_shapes_and_values():
    from vitlab.compat.vit_pytorch.vit_for_small_dataset import SPT
    from vitlab.compat.vit_pytorch.vit_with_patch_merger import PatchMerger

    spt = SPT(dim=24, patch_size=4, channels=3)
    img = torch.randn(2, 3, 16, 24)
    assert spt(img).shape == (2, 4 * 6, 24)
    merger = PatchMerger(dim=16, num_tokens_out=3)
    x = torch.randn(2, 10, 16)
    t = merger.norm(x)
    want = torch.softmax(torch.einsum("md,bnd->bmn", merger.queries, t), dim=-1) @ t  # Renggli et al., sec. 3
    torch.testing.assert_close(merger(x), want)


def test_vivit_readme_name_and_variants():
    from vitlab.compat.vit_pytorch.vivit import ViT, ViViT
    from vitlab.models.video import VideoViT, ViViTFactorisedEncoder

    kw = dict(VIDEO, image_size=32, frames=4, image_patch_size=8, num_classes=5, dim=32, heads=2, mlp_dim=48,
              spatial_depth=1, temporal_depth=1)
    assert ViT is ViViT and isinstance(ViT(**kw), ViViTFactorisedEncoder)
    fsa = ViT(**dict(kw, variant="factorized_self_attention", pool="mean"))
    assert isinstance(fsa, VideoViT) and fsa.factorisation == "self_attention"
    with pytest.raises(ValueError, match="pool='cls'"):
        ViT(**dict(kw, variant="factorized_self_attention"))
