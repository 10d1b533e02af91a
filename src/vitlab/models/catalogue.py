"""The model catalogue of ``docs/catalogue.md``, generated from the registry (``vitlab models --catalogue``).

One row per registered model: its paper, the parts it is built from, its parameter count (counted here,
on the ``meta`` device), the reference count it is checked against (timm's model, exactly, where timm has
the name; otherwise the paper's table or the official code, as pinned by the family's tests), whether
timm has it and the vit-pytorch class a vit-pytorch user would reach for.  The per-family facts are the
:data:`ENTRIES` below (first matching pattern wins); a test checks that every registered model has an
entry and that ``docs/catalogue.md`` is current.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

__all__ = ["Entry", "ENTRIES", "REFERENCES", "entry_for", "catalogue_markdown"]


class Entry(NamedTuple):
    paper: str
    parts: str
    vit_pytorch: str = "-"


_VIT_PARTS = "patch stem, class token, learned table, pre-norm softmax blocks"
ENTRIES: List[Tuple[str, Entry]] = [
    ("lipsformer_*", Entry("LipsFormer (Qi et al., ICLR 2023)", "core `cosine`, norm `center`, shortcut `weighted`, "
                           "init `spectral`, wiring `post` + conv units (ViT) / as the family")),
    ("flatten_*", Entry("FLatten Transformer (Han et al., ICCV 2023)", "core `focused_linear` in the family's "
                        "blocks")),
    ("attnscale_*", Entry("Anti-oversmoothing (Wang et al., ICLR 2022)", "modifier `attnscale`")),
    ("featscale_*", Entry("Anti-oversmoothing (Wang et al., ICLR 2022)", "block `featscale`")),
    ("beit*", Entry("BEiT (Bao et al., ICLR 2022) / BEiT v2 (Peng et al., 2022)", "ViT + position `beit_relative` "
                    "(per block, class-token rows), no position table, projection `linear_qv_bias`, LayerScale, "
                    "average pool + fc_norm (timm's Beit)")),
    ("deit3_*", Entry("DeiT III (Touvron et al., ECCV 2022)", "ViT + shortcut `layerscale`, patch-only position "
                      "table", "vit.ViT")),
    ("vit5_*", Entry("ViT-5 (Wang et al., 2026)", "ViT + norm `rms`, shortcut `layerscale` (1e-4), projection qk_norm "
                     "`rms`, no qkv bias, patch-only table + position `rope` (base 10000, `yx`), 4 registers with "
                     "their own RoPE (`rope_registers=4`, base 100)", "vit_5.ViT")),
    ("eva02_*", Entry("EVA-02 (Fang et al., 2023)", "ViT/14 + class token and learned table, position `rope` "
                      "(`rope_order='yx'`, `rope_ref_grid=(16, 16)`), channel mixer `swiglu_packed` + "
                      "projection `linear_qv_bias` (Ti, S) or `swiglu_norm` (sub-LN) + `separate_qv_bias` "
                      "(B, L), average pooling (timm's Eva)")),
    ("vit_*_rope_reg[14]_*", Entry("Vision Transformers Need Registers (Darcet et al., ICLR 2024) + EVA-02 RoPE "
                                   "(Fang et al., 2023)", "ViT + 1 or 4 registers, no position table, position "
                                   "`rope` (`rope_order='yx'`, `rope_ref_grid=(16, 16)`), projection "
                                   "`linear_qv_bias`, LayerScale, average pooling (timm's Eva)")),
    ("vit_d*_reg1_gap_*", Entry("Differential Transformer (Ye et al., ICLR 2025) + registers", "ViT + 1 register, "
                                "core `differential`; dpwee: + wiring `parallel_scaling`")),
    ("vit_pwee_*", Entry("ViT-22B parallel block (Dehghani et al., ICML 2023) + registers", "ViT + 1 register, "
                         "wiring `parallel_scaling` (one norm, one LayerScale over both branches)")),
    ("vit_*_reg[14]_*", Entry("Vision Transformers Need Registers (Darcet et al., ICLR 2024)", "ViT + 1 or 4 "
                              "register prefix tokens, patch-only table (so150m*: the table covers the registers "
                              "too); giant: channel mixer `swiglu_packed`; `*_map_*`: attention-pooling head")),
    ("*_18x2_*", Entry("Three things everyone should know about ViTs (Touvron et al., ECCV 2022)",
                       "Block with 2 parallel attention + 2 parallel MLP branches, LayerScale",
                       "parallel_vit.ViT")),
    ("ats_*", Entry("ATS (Fayyaz et al., ECCV 2022)", "ViT/DeiT + adaptive token sampling in the last 3/4 of the "
                    "blocks (`ats=`)", "ats_vit.ViT")),
    ("deit_*distilled*", Entry("DeiT (Touvron et al., ICML 2021)", _VIT_PARTS + ", distillation token + head",
                               "distill.DistillableViT")),
    ("deit_*", Entry("DeiT (Touvron et al., ICML 2021)", _VIT_PARTS, "vit.ViT")),
    ("simple_vit_*", Entry("Better plain ViT baselines (Beyer et al., 2022)", "pos `sincos_big_vision`, no class "
                           "token, average pool", "simple_vit.SimpleViT")),
    ("deepvit_*", Entry("DeepViT (Zhou et al., 2021)", "stem `deepvit_conv`, modifier `reattention` in the last "
                        "blocks", "deepvit.DeepViT")),
    ("vit_small_data_*", Entry("ViT for small-size datasets (Lee et al., 2021)", "stem `spt` and/or modifier `lsa`",
                               "vit_for_small_dataset.ViT")),
    ("localvit_*", Entry("LocalViT (Li et al., 2021)", "channel mixer `localvit` (depthwise-conv MLP)",
                         "local_vit.LocalViT")),
    ("t2t_vit_*", Entry("Tokens-to-Token ViT (Yuan et al., ICCV 2021)", "stem `t2t` (soft split + performer / "
                        "transformer token layers), pos `sincos_1d`", "t2t.T2TViT")),
    ("cct_*", Entry("Compact Convolutional Transformers (Hassani et al., 2021)", "stem `cct`, pool `seqpool`, no "
                    "class token", "cct.CCT")),
    ("xcit_*", Entry("XCiT (El-Nouby et al., NeurIPS 2021)", "core `cross_covariance`, LPI local branch, Fourier "
                     "position code, class-attention tail", "xcit.XCiT")),
    ("navit_*", Entry("NaViT (Dehghani et al., NeurIPS 2023)", "packed sequences, block-diagonal masks, factorised "
                      "position tables, attention pooling", "na_vit.NaViT")),
    ("vivit_*_fe", Entry("ViViT (Arnab et al., ICCV 2021), model 2", "stem tubelet + frame class tokens, grouping "
                         "`axial` (space), temporal stage", "vivit.ViT (factorized_encoder)")),
    ("vivit_*_fsa", Entry("ViViT (Arnab et al., ICCV 2021), model 3", "stem tubelet, grouping `axial` space / time "
                          "blocks", "vivit.ViT (factorized_self_attention)")),
    ("vivit_*", Entry("ViViT (Arnab et al., ICCV 2021), model 1", "stem tubelet, global attention over 3-D grid",
                      "vit_3d.ViT")),
    ("vit3d_*", Entry("3-D ViT (ViViT model 1 on volumes)", "stem tubelet, global attention over 3-D grid",
                      "vit_3d.ViT")),
    ("cait_*", Entry("CaiT (Touvron et al., ICCV 2021)", "modifier `talking_heads`, LayerScale, class-attention "
                     "tail (wiring `prefix`)", "cait.CaiT")),
    ("swinv2_*", Entry("Swin V2 (Liu et al., CVPR 2022)", "Swin + wiring `res_post`, core `cosine` (learned "
                       "per-head logit scale), position `cpb`, projection `linear_qv_bias`, merging: norm after")),
    ("swin_*", Entry("Swin (Liu et al., ICCV 2021)", "grouping `window` (shifted), relative table, patch merging")),
    ("cswin_*", Entry("CSwin (Dong et al., CVPR 2022)", "grouping `stripes`, LePE, conv merge")),
    ("pit_*", Entry("PiT (Heo et al., ICCV 2021)", "conv stem, class token carried through depthwise-conv pooling "
                    "(fc on prefix tokens) between 3 stages; distilled: + distillation token and head", "pit.PiT")),
    ("nest_*", Entry("NesT (Zhang et al., AAAI 2022)", "grouping `window` over image blocks (one table per level), "
                     "block aggregation (conv, norm, max-pool) between levels", "nest.NesT")),
    ("twins_pcpvt_*", Entry("Twins (Chu et al., NeurIPS 2021), PCPVT", "grouping `spatial_reduction`, PEG position "
                            "code after each stage's first block, mean pool")),
    ("twins_svt_*", Entry("Twins (Chu et al., NeurIPS 2021), SVT", "grouping `window` (LSA, padded, no shift) "
                          "alternating with `spatial_reduction` (GSA), PEG, mean pool", "twins_svt.TwinsSVT")),
    ("levit_*s8", Entry("LeViT (Graham et al., ICCV 2021), timm's stride-8 variant", "as levit_* with a 3-conv "
                        "stride-8 stem (`stem_type='s8'`) and SiLU; 512_s8 without distillation head", "levit.LeViT")),
    ("levit_*512", Entry("LeViT (Graham et al., ICCV 2021), timm's wider variant", "as levit_* with SiLU, no "
                         "distillation head", "levit.LeViT")),
    ("levit_*d", Entry("LeViT (Graham et al., ICCV 2021), timm's deeper variant", "as levit_* with depths (4, 8, 6), "
                       "SiLU, no distillation head", "levit.LeViT")),
    ("levit_*", Entry("LeViT (Graham et al., ICCV 2021)", "conv stem (BN + hard-swish), projection and MLP "
                      "`linear_norm`, position `offset`, shrinking attention (grouping `subsample`) between 3 stages, "
                      "BN + Linear head + distillation head", "levit.LeViT")),
    ("cvt_*", Entry("CvT (Wu et al., ICCV 2021)", "projection `conv` (depthwise 3x3 conv + BN; k/v stride 2), conv "
                    "token embeddings, no position table, class token in the last stage", "cvt.CvT")),
    ("mobilevit_*", Entry("MobileViT (Mehta & Rastegari, ICLR 2022)", "conv stem, MV2 inverted residuals; MobileViT "
                          "blocks: 3x3 + 1x1 conv, grouping `unfold` (2x2 patches), conv fusion", "mobile_vit.MobileViT")),
    ("crossformer_*", Entry("CrossFormer (Wang et al., ICLR 2022)", "cross-scale embedding stem and merges, grouping "
                            "`window` (SDA) alternating with `dilated` (LDA), position `dynamic` (DPB)",
                            "crossformer.CrossFormer")),
    ("scalablevit_*", Entry("ScalableViT (Yang et al., ECCV 2022)", "grouping `window` + position `lim` (IWSA) "
                            "alternating with grouping `scalable_reduction` + projection `scalable` (SSA), PEG, MLP head",
                            "scalable_vit.ScalableViT")),
    ("sepvit_*", Entry("SepViT (Li et al., 2022)", "grouping `separable` (window tokens; attention inside, then across "
                       "windows), overlapping conv embeddings, PEG", "sep_vit.SepViT")),
    ("regionvit_*", Entry("RegionViT (Chen et al., ICLR 2022)", "regional tokens as the prefix of their local windows: "
                          "grouping `regional` (regional self-attention, then regional-to-local), position "
                          "`regional_relative`", "regionvit.RegionViT")),
    ("lookupvit_*", Entry("LookupViT (Koner et al., ECCV 2024)", "compressed tokens (Block) and lookup tokens joined by "
                          "a bidirectional cross-attention sharing one logit matrix", "look_vit.LookViT")),
    ("maxvit_*", Entry("MaxViT (Tu et al., ECCV 2022)", "conv stem (BN + GELU), MBConv + SE (downsampler and per "
                       "block); grouping `window` (block attention) then `grid` (grid attention), each with position "
                       "`relative`; LayerNorm + Linear-tanh pre-logits head", "max_vit.MaxViT")),
    ("crossvit_*", Entry("CrossViT (Chen et al., ICCV 2021)", "two branches of Blocks (small and large patches), each "
                         "with a class token; fusion: the projected class token is the one query (projection "
                         "`separate`, grouping `class_query`) over the other branch's patches; dagger: 3-conv stem; "
                         "mean of the two heads", "cross_vit.CrossViT")),
    ("pvt_v2_*", Entry("PVTv2 (Wang et al., CVM 2022)", "grouping `spatial_reduction` (or linear), overlapping "
                       "conv stems, MLP with depthwise conv")),
    ("pvt_*", Entry("PVT (Wang et al., ICCV 2021)", "grouping `spatial_reduction`, per-stage tables", "pvt.PvT")),
    ("alternet*", Entry("How do ViTs work? AlterNet (Park & Kim, ICLR 2022)", "pre-activation ResNet with MSA "
                        "blocks (grouping `window`) closing stages")),
    ("*resnet*", Entry("ResNet (He et al., CVPR 2016) / pre-activation (He et al., ECCV 2016)", "convolutions")),
    ("samvit_*", Entry("Segment Anything (Kirillov et al., ICCV 2023) / ViTDet (Li et al., ECCV 2022)", "ViT without "
                       "class token, grouping `window` (14, padded) + global blocks, position `decomposed_relative`, "
                       "conv neck (1x1, LN, 3x3, LN), average pool")),
    ("convit_*", Entry("ConViT (d'Ascoli et al., ICML 2021)", "ViT + modifier `gpsa` (gated positional "
                       "self-attention) on projection `qk_v` in the first 10 blocks, class token joining after them, "
                       "patch-only table")),
    ("vit_*", Entry("ViT (Dosovitskiy et al., ICLR 2021)", _VIT_PARTS, "vit.ViT")),
]

# reference parameter counts of the models timm lacks: (count, source), as pinned by their family tests
REFERENCES: Dict[str, Tuple[str, str]] = {
    "t2t_vit_7": ("4.3M", "paper table 4 (with the frozen tables)"), "t2t_vit_14": ("21.5M", "paper table 4"),
    "t2t_vit_19": ("39.2M", "paper table 4"), "t2t_vit_24": ("64.1M", "paper table 4"),
    "vit5_small": ("22.04M", "official code 22,039,144 exact"), "vit5_base": ("86.54M", "official code 86,543,080 exact"),
    "vit5_large": ("304.26M", "official code 304,258,024 exact"),
    "vit5_xlarge": ("448.51M", "official code 448,505,128 exact"),
    "cct_7_3x1_32": ("3.76M", "official code and README"), "cct_14_7x2_224": ("22.37M", "official code"),
    "deepvit_s": ("27M", "paper; official code exact"), "deepvit_l": ("58.9M", "official code"),
    "vit_small_data_patch4_32": ("2.69M", "official code"), "vit_small_data_sl_patch4_32": ("2.73M", "official code"),
    "localvit_tiny": ("5.98M", "official code (+4,608: vitlab keeps the block's norm2)"),
    "simple_vit_small_patch16_224": ("21.97M", "timm ViT-S/16 without class token and table"),
    "cvt_13_224": ("20M", "paper table 2; official code 19,997,480 exact"),
    "cvt_13_384": ("20M", "paper table 2; official code 19,997,480 exact"),
    "cvt_21_224": ("32M", "paper table 2; official code 31,622,696 exact"),
    "cvt_21_384": ("32M", "paper table 2; official code 31,622,696 exact"),
    "cvt_w24_384": ("277M", "paper table 2; official code 277,196,392 exact"),
    "crossformer_tiny": ("27.8M", "paper table"), "crossformer_small": ("30.7M", "paper table"),
    "crossformer_base": ("52.0M", "paper table"), "crossformer_large": ("92.0M", "paper table"),
    "scalablevit_small": ("32.4M", "paper/README; official code 32.0M, followed"),
    "scalablevit_base": ("81.9M", "README; official code equal"),
    "scalablevit_large": ("104.9M", "paper/README; official code 109.3M, followed"),
    "sepvit_tiny": ("31.2M", "paper table; official code exact"), "sepvit_small": ("46.6M", "paper table; official code "
                                                                                           "exact"),
    "sepvit_base": ("82.3M", "paper table; official code 82.38M, followed"), "sepvit_lite": ("3.66M", "official code"),
    "regionvit_tiny": ("13.8M", "paper table 1; official code exact"),
    "regionvit_small": ("30.6M", "paper table 1; official code exact"),
    "regionvit_medium": ("41.2M", "paper table 1; official code exact"),
    "regionvit_base": ("72.7M", "paper table 1; official code exact"),
}


def entry_for(name: str) -> Optional[Entry]:
    return next((e for pat, e in ENTRIES if fnmatch.fnmatch(name, pat)), None)


def _count(name: str) -> int:
    from vitlab.models.factory import create_model

    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name).parameters())


def catalogue_markdown() -> str:
    import timm

    from vitlab.models.factory import list_models

    out = ["# Model catalogue", "",
           "Generated by `vitlab models --catalogue` (`vitlab.models.catalogue`); do not edit by hand.  Parameters are",
           "counted on the `meta` device at the default size.  *timm*: `yes` means timm has the name; its parameter",
           "count is equal (tests/test_param_counts.py) and its weights load strictly (logits compared with every",
           "parameter randomised in the family's parity tests).  *reference*: the paper's or official code's count",
           "for models timm lacks.", "",
           "| model | paper | parts | params (M) | reference | timm | vit-pytorch |", "|---|---|---|---:|---|---|---|"]
    for name in list_models():
        e = entry_for(name)
        if e is None:
            raise ValueError(f"model {name!r} has no catalogue entry; add a pattern to vitlab.models.catalogue.ENTRIES")
        ref = REFERENCES.get(name)
        in_timm = "yes" if timm.list_models(name) == [name] else "no"
        out.append(f"| `{name}` | {e.paper} | {e.parts} | {_count(name) / 1e6:.2f} | "
                   f"{'= timm' if in_timm == 'yes' else (f'{ref[0]} ({ref[1]})' if ref else '-')} | {in_timm} | "
                   f"{e.vit_pytorch} |")
    return "\n".join(out) + "\n"
