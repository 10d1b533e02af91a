"""vitlab.compat.vit_pytorch PiT, TwinsSVT and NesT: vit-pytorch's README examples with only the import changed give
vit-pytorch's output shape (built side by side on the meta device), the arguments are mapped onto the paper's
architecture (checked against the vitlab recipe they should equal, or counted per layer), arguments vitlab cannot
honour are refused, and small models train."""
import importlib

import pytest
import torch

import vitlab

vit_pytorch = pytest.importorskip("vit_pytorch")
pytestmark = pytest.mark.usefixtures("one_thread")

README = {
    "pit": ("PiT", dict(image_size=224, patch_size=14, dim=256, num_classes=1000, depth=(3, 3, 3), heads=16,
                        mlp_dim=2048, dropout=0.1, emb_dropout=0.1)),
    "twins_svt": ("TwinsSVT", dict(num_classes=1000, s1_emb_dim=64, s1_patch_size=4, s1_local_patch_size=7,
                                   s1_global_k=7, s1_depth=1, s2_emb_dim=128, s2_patch_size=2, s2_local_patch_size=7,
                                   s2_global_k=7, s2_depth=1, s3_emb_dim=256, s3_patch_size=2, s3_local_patch_size=7,
                                   s3_global_k=7, s3_depth=5, s4_emb_dim=512, s4_patch_size=2, s4_local_patch_size=7,
                                   s4_global_k=7, s4_depth=4, peg_kernel_size=3, dropout=0.)),
    "nest": ("NesT", dict(image_size=224, patch_size=4, dim=96, heads=3, num_hierarchies=3, block_repeats=(2, 2, 8),
                          num_classes=1000)),
}


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _classes(mod):
    cls = README[mod][0]
    return (getattr(importlib.import_module(f"vit_pytorch.{mod}"), cls),
            getattr(importlib.import_module(f"vitlab.compat.vit_pytorch.{mod}"), cls))


@pytest.mark.parametrize("mod", sorted(README))
def test_readme_example_same_output_shape(mod):
    ref_cls, our_cls = _classes(mod)
    kw = README[mod][1]
    with torch.device("meta"):
        ref, ours = ref_cls(**kw).eval(), our_cls(**kw).eval()
        x = torch.empty(1, 3, 224, 224)
        assert ours(x).shape == ref(x).shape == (1, 1000)


def test_nest_readme_is_the_paper_nest_tiny():
    from vitlab.compat.vit_pytorch.nest import NesT

    with torch.device("meta"):
        ours, recipe = NesT(**README["nest"][1]), vitlab.create_model("nest_tiny", drop_path_rate=0.0)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in recipe.state_dict().items()]
    assert [len(lv.blocks) for lv in ours.levels] == [2, 2, 8]


def test_twins_readme_maps_pairs_heads_and_reductions():
    from vitlab.compat.vit_pytorch.twins_svt import TwinsSVT

    with torch.device("meta"):
        ours = TwinsSVT(**README["twins_svt"][1])
        paper = TwinsSVT(**dict(README["twins_svt"][1], s1_global_k=8, s2_global_k=4, s3_global_k=2, s4_global_k=1))
    # 1 + depth LSA/GSA pairs (stage 4: GSA only), paper's heads of 32 channels, PEG after the first block
    kinds = [[b.attn.grouping.name for b in s.blocks] for s in ours.stages]
    assert kinds[:3] == [["window", "spatial_reduction"] * n for n in (2, 2, 6)]
    assert kinds[3] == ["spatial_reduction"] * 5
    assert [s.blocks[0].attn.num_heads for s in ours.stages] == [2, 4, 8, 16]
    assert [s.blocks[1].attn.sr.kernel_size for s in ours.stages] == [(7, 7)] * 4
    # k honoured: each GSA's reduction conv is dim * dim * k^2 + dim; the paper's k = 8, 4, 2, 1 (no conv in stage 4)
    gsa = (2, 2, 6, 5)
    diff = sum(n * (d * d * (49 - k * k)) for n, d, k in zip(gsa, (64, 128, 256, 512), (8, 4, 2)))
    diff += gsa[3] * (512 * 512 * 49 + 512 + 2 * 512)  # stage 4 with k = 1: no conv, no norm
    assert _count(ours) - _count(paper) == diff
    ref_cls, _ = _classes("twins_svt")
    with torch.device("meta"):
        assert _count(ref_cls(**README["twins_svt"][1])) > 2 * _count(ours)  # vit-pytorch's 512-wide GSA convs


def test_pit_readme_widens_the_mlp_with_the_stage():
    from vitlab.compat.vit_pytorch.pit import PiT

    with torch.device("meta"):
        ours = PiT(**README["pit"][1])
        ref = _classes("pit")[0](**README["pit"][1])
    widths = [s.blocks[0].mlp.fc1.out_features for s in ours.transformers]
    assert widths == [2048, 4096, 8192]  # mlp_dim / dim = 8 at every width (the paper); vit-pytorch 2048 throughout
    assert [s.blocks[0].attn.inner for s in ours.transformers] == [16 * 64] * 3  # dim_head honoured
    # vitlab - vit-pytorch: wider MLPs, no pointwise conv in the poolings, a table without the class row, qkv biases
    mlps = sum(3 * (2 * d * (8 * d - 2048) + (8 * d - 2048)) for d in (512, 1024))
    pools = sum(2 * d * 2 * d + 2 * d for d in (256, 512))
    assert _count(ours) - _count(ref) == mlps - pools - 256 + 9 * 3 * 1024


def test_refusals_name_the_argument():
    from vitlab.compat.vit_pytorch.nest import NesT
    from vitlab.compat.vit_pytorch.pit import PiT
    from vitlab.compat.vit_pytorch.twins_svt import TwinsSVT

    with pytest.raises(ValueError, match="s3_patch_size=4 is not supported"):
        TwinsSVT(num_classes=10, s3_patch_size=4)
    with pytest.raises(ValueError, match="peg_kernel_size=5 is not supported"):
        TwinsSVT(num_classes=10, peg_kernel_size=5)
    with pytest.raises(ValueError, match="s\\*_emb_dim=.* multiples of 32"):
        TwinsSVT(num_classes=10, s1_emb_dim=48)
    with pytest.raises(ValueError, match="heads=\\(3, 3\\) is not supported"):
        PiT(**dict(README["pit"][1], depth=(1, 1), heads=(3, 3)))
    with pytest.raises(ValueError, match="depth=3 must be a tuple"):
        PiT(**dict(README["pit"][1], depth=3))
    with pytest.raises(ValueError, match="image_size=225 is not supported"):
        NesT(**dict(README["nest"][1], image_size=225))
    with pytest.raises(ValueError, match="num_classes=0 is not supported"):
        NesT(**dict(README["nest"][1], num_classes=0))


SMALL = {
    "pit": dict(image_size=32, patch_size=8, dim=16, num_classes=5, depth=(1, 1), heads=2, mlp_dim=32, dim_head=8),
    "twins_svt": dict(num_classes=5, s1_emb_dim=32, s1_local_patch_size=2, s1_global_k=2, s1_depth=0,
                      s2_emb_dim=32, s2_local_patch_size=2, s2_global_k=2, s2_depth=0, s3_emb_dim=32,
                      s3_local_patch_size=2, s3_global_k=1, s3_depth=0, s4_emb_dim=32, s4_global_k=1, s4_depth=0,
                      image_size=64),
    "nest": dict(image_size=32, patch_size=4, dim=16, heads=2, num_hierarchies=2, block_repeats=1, num_classes=5),
}


@pytest.mark.parametrize("mod", sorted(SMALL))
def test_small_models_train_and_match_the_reference_shape(mod):
    ref_cls, our_cls = _classes(mod)
    torch.manual_seed(0)
    ours, ref = our_cls(**SMALL[mod]), ref_cls(**{k: v for k, v in SMALL[mod].items() if k != "image_size"
                                                  or mod != "twins_svt"}).eval()
    side = SMALL[mod].get("image_size", 64)
    x = torch.randn(2, 3, side, side)
    y = ours.train()(x)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
    with torch.no_grad():
        assert ours.eval()(x).shape == ref(x).shape == (2, 5)
