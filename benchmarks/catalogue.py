"""The catalogue's models that timm also has, vitlab vs timm in one run (inference, float32, CPU).

    python benchmarks/catalogue.py                    # one model per architecture, batch 16
    python benchmarks/catalogue.py --all              # every catalogue name timm has (hours on 2 cores)
    python benchmarks/catalogue.py --models xcit_nano_12_p16_224 --train

The catalogue is issues 14 and 15's list of variants timm also has (DeiT III, register tokens, parallel
blocks, XCiT, PiT, Twins, NesT, ...), plus BEiT, EVA-02, Swin V2, ConViT and SAM's image encoder.  By default
one size of each architecture runs at its default input size (the register ViTs of DINOv2 at 224 px instead of
518: 1,370 tokens are minutes per step here).  Models vitlab has not registered yet are listed as not run.  Steps
alternate vitlab/timm.
"""
from __future__ import annotations

import fnmatch

import _common as C  # noqa: I001

# one per architecture: vitlab name == timm name
DEFAULT = ["deit3_small_patch16_224", "vit_base_patch16_reg4_gap_256", "vit_small_patch14_reg4_dinov2",
           "vit_small_patch16_18x2_224", "xcit_nano_12_p16_224", "xcit_tiny_12_p8_224", "pit_s_224",
           "twins_svt_small", "twins_pcpvt_small", "nest_tiny", "levit_128s", "maxvit_tiny_tf_224", "mobilevit_s",
           "crossvit_9_240", "beit_base_patch16_224", "eva02_small_patch14_224", "swinv2_tiny_window8_256",
           "convit_tiny", "samvit_base_patch16_224"]
# --all: every vitlab name matching these (issue 14's isotropic models, issue 15's hierarchical ones)
PATTERNS = ["deit3_*", "vit_*_reg[14]_*", "vit_*_18x2_*", "xcit_*", "pit_*", "twins_*", "nest_*", "levit_*", "maxvit_*",
            "mobilevit_*", "crossvit_*", "beit*", "eva02_*", "swinv2_*", "convit_*", "samvit_*"]


def _all_names():
    import timm

    import vitlab

    names = [n for n in vitlab.list_models() if any(fnmatch.fnmatch(n, p) for p in PATTERNS)]
    return [n for n in names if timm.list_models(n) == [n]]


def main() -> int:
    p = C.common_args(__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true")
    p.add_argument("--all", action="store_true", help="every catalogue name timm also has")
    p.add_argument("--models", nargs="+", default=None, help=f"vitlab names (default: {' '.join(DEFAULT)})")
    p.add_argument("--img-size", type=int, default=None, help="build every model at this size (default: each one's "
                   "own, 224 for the DINOv2 register ViTs)")
    args = p.parse_args()
    C.setup(args)
    names = args.models or (_all_names() if args.all else DEFAULT)
    dinov2 = [n for n in names if n.endswith("dinov2")]
    rest = [n for n in names if n not in dinov2]
    if args.img_size is None and dinov2:  # 518 px is the DINOv2 size; 224 keeps a step under a second here
        C.vs_timm(args, {n: n for n in dinov2}, "catalogue_dinov2", "Catalogue: DINOv2 register ViTs at 224 px vs timm",
                  img_size=224)
        names = rest
    return C.vs_timm(args, {n: n for n in names}, "catalogue", "Catalogue models vs timm", img_size=args.img_size)


if __name__ == "__main__":
    raise SystemExit(main())
