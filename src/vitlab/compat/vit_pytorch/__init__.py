"""vit-pytorch's README classes, with vit-pytorch's constructor arguments, built from vitlab's parts and families.

    from vitlab.compat.vit_pytorch import ViT          # was: from vit_pytorch import ViT
    v = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048)

Each class is (a subclass of) a vitlab model, so it has vitlab's model contract (``forward_features``,
``forward_intermediates``, ``record_attention``, ...).  Submodules mirror vit-pytorch's module paths
(``vitlab.compat.vit_pytorch.cait.CaiT``, ``...vit_for_small_dataset.ViT``, ``...vivit.ViT``); every argument is
mapped explicitly and one vitlab cannot honour raises a ``ValueError`` naming it.  Where vit-pytorch deviates from
the paper, vitlab follows the paper (each class docstring says where).  See ``docs/vit_pytorch.md``."""
import importlib

__all__ = ["ViT", "SimpleViT", "DeepViT", "CaiT", "T2TViT", "CCT", "DistillableViT", "DistillWrapper", "XCiT",
           "NaViT", "LeViT", "CvT", "MobileViT", "CrossFormer", "ScalableViT", "SepViT", "PiT", "TwinsSVT", "NesT",
           "RegionViT", "LookViT", "MaxViT", "CrossViT", "Recorder", "Extractor", "MAE", "SimMIM", "MPP", "MP3", "Dino"]

_LAZY = {"ViT": "vit", "SimpleViT": "simple_vit", "DeepViT": "deepvit", "CaiT": "cait", "T2TViT": "t2t",
         "CCT": "cct", "DistillableViT": "distill", "DistillWrapper": "distill", "XCiT": "xcit", "NaViT": "na_vit",
         "LeViT": "levit", "CvT": "cvt", "MobileViT": "mobile_vit", "CrossFormer": "crossformer",
         "ScalableViT": "scalable_vit", "SepViT": "sep_vit", "PiT": "pit", "TwinsSVT": "twins_svt", "NesT": "nest",
         "RegionViT": "regionvit", "LookViT": "look_vit", "MaxViT": "max_vit", "CrossViT": "cross_vit",
         "Recorder": "recorder", "Extractor": "extractor", "MAE": "mae", "SimMIM": "simmim", "MPP": "mpp",
         "MP3": "mp3", "Dino": "dino"}


def __getattr__(name):  # lazy, so importing one class does not build every family
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
