"""vitlab parts: small modules with one job each, chosen by name.

* mixers (:data:`MIXERS`): ``softmax``, ``cosine``, ``focused_linear``, ``attnscale``, ``pooling``
* attention parts: projections, groupings, cores, modifiers, position biases (:mod:`vitlab.layers.attn_parts`)
* norms (:data:`NORMS`): ``layernorm``, ``center``, ``rms``
* shortcuts (:data:`SHORTCUTS`): ``plain``, ``weighted``, ``layerscale``
* initialisers (:data:`INITS`): ``trunc_normal``, ``xavier``, ``spectral``
* patch embeddings (:data:`EMBEDS`): ``patch``, ``conv``, ``t2t``, ``cct`` (:mod:`vitlab.layers.tokenizers`);
  position encodings ``learned``, ``sincos``, ``sincos_1d``, ``none``
* conditional position codes (:data:`POS_CODES`): ``peg`` (:mod:`vitlab.layers.peg`)
* :class:`FeatScale`, :class:`Mlp`, :class:`DropPath`, :class:`DWConvUnit`; channel mixers
  (:data:`CHANNEL_MIXERS`): ``mlp``, ``localvit``, ``localvit_se``; also ``embed="spt"`` / ``"deepvit_conv"``,
  modifier ``lsa`` (:mod:`vitlab.layers.spt`), position part ``rope`` (:mod:`vitlab.layers.rope`)
* token-count parts (:mod:`vitlab.layers.token_ops`): PatchDropout, PatchMerger, adaptive token sampling;
  projection ``memory``: learned memory tokens on the keys and values (:mod:`vitlab.layers.memory`)
"""
from timm.layers import DropPath  # noqa: F401  (stochastic depth, Huang et al. 2016; timm's is well kept)

from vitlab.layers.attention import Attention, AttnScale, CosineAttention
from vitlab.layers.conv_unit import DWConvUnit
from vitlab.layers.featscale import FeatScale
from vitlab.layers.init import INITS, init_weights, spectral_init_, spectral_norm_of
from vitlab.layers.attention import FocusedLinearAttention
from vitlab.layers.attn_parts import CORES, GROUPINGS, MODIFIERS, POSITION_BIASES, PROJECTIONS, AttentionPart
from vitlab.layers.layout import TokenLayout
from vitlab.layers.linear_attention import focusing_function
from vitlab.layers.mha import MultiHeadAttention
from vitlab.layers.mixers import MIXERS, MixerSpec, Pooling, create_mixer
from vitlab.layers import xca as _xca, xcit_parts as _xcit_parts  # noqa: F401 (register cross_covariance, xcit_conv)
from vitlab.layers import cores as _cores, grouping as _grouping, modifiers as _modifiers  # noqa: F401 (register)
from vitlab.layers import position_bias as _position, projection as _projection  # noqa: F401 (register)
from vitlab.layers.video import AxialGrouping, TubeletEmbed, sincos_nd  # noqa: F401 (registers 'axial')
from vitlab.layers import memory as _memory  # noqa: F401 (registers projection "memory")
from vitlab.layers import conv_projection as _conv_projection  # noqa: F401 (registers projection "conv", CvT)
from vitlab.layers import rope as _rope, spt as _spt  # noqa: F401 (register position "rope", embed "spt", "lsa")
from vitlab.layers import beit_position as _beit_position  # noqa: F401 (registers position "beit_relative")
from vitlab.layers import regional as _regional  # noqa: F401 (registers grouping "regional", RegionViT)
from vitlab.layers import separable as _separable  # noqa: F401 (registers grouping "separable", SepViT)
from vitlab.layers import unfold as _unfold  # noqa: F401 (registers grouping "unfold", MobileViT)
from vitlab.layers import dilated as _dilated, dynamic_position as _dpb  # noqa: F401 ("dilated", "dynamic": CrossFormer)
from vitlab.layers import scalable_attention as _ssa  # noqa: F401 ("scalable_reduction", "scalable", "lim", ScalableViT)
from vitlab.layers import grid as _grid  # noqa: F401 (registers grouping "grid", MaxViT)
from vitlab.layers.mlp import CHANNEL_MIXERS, Mlp
from vitlab.layers import glu as _glu  # noqa: F401 (registers channel mixer "swiglu_packed", DINOv2-g)
from vitlab.layers import differential as _differential  # noqa: F401 (registers core "differential")
from vitlab.layers import cpb as _cpb  # noqa: F401 (registers position "cpb", Swin V2)
from vitlab.layers import decomposed_position as _decomposed  # noqa: F401 (position "decomposed_relative", SAM)
from vitlab.layers import linear_norm as _lnorm, offset_bias as _offset  # noqa: F401 (LeViT's parts)
from vitlab.layers import gpsa as _gpsa  # noqa: F401 (registers modifier "gpsa", projection "qk_v", ConViT)
from vitlab.layers.norm import NORMS, CenterNorm, create_norm
from vitlab.layers.patch_embed import EMBEDS, ConvStem, PatchEmbed, to_2tuple
from vitlab.layers.peg import PEG, POS_CODES, create_pos_code  # conditional position codes (CPVT, Twins)
from vitlab.layers.pos_embed import POS_EMBEDS, resample_pos_embed, sincos_1d, sincos_2d
from vitlab.layers.tokenizers import CCTTokenizer, T2TEmbed  # registers embed="t2t" / "cct"
from vitlab.layers.recording import AttentionRecorder, RecordsAttention, record_attention
from vitlab.layers.shortcut import SHORTCUTS, ChannelScale, create_shortcut

__all__ = [
    "Attention", "AttnScale", "CosineAttention", "FocusedLinearAttention", "focusing_function", "MIXERS",
    "create_mixer", "CenterNorm", "NORMS", "create_norm", "SHORTCUTS", "ChannelScale", "create_shortcut",
    "FeatScale", "Mlp", "DropPath", "DWConvUnit", "INITS", "init_weights", "spectral_init_", "spectral_norm_of",
    "EMBEDS", "PatchEmbed", "ConvStem", "T2TEmbed", "CCTTokenizer", "to_2tuple", "POS_EMBEDS", "sincos_1d",
    "sincos_2d", "resample_pos_embed",
    "record_attention", "RecordsAttention", "AttentionRecorder", "MultiHeadAttention", "TokenLayout", "MixerSpec",
    "Pooling", "AttentionPart", "CORES", "GROUPINGS", "MODIFIERS", "POSITION_BIASES", "PROJECTIONS",
    "CHANNEL_MIXERS", "PEG", "POS_CODES", "create_pos_code",
]
