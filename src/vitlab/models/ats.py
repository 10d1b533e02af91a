"""ATS: "Adaptive Token Sampler for Efficient Vision Transformers" (Fayyaz, Koohpayegani, Jafari, Sengupta,
Joze, Sommerlade, Pirsiavash and Gall, ECCV 2022), as recipes on vitlab's ViT.

ATS is parameter-free, so an ATS model is the plain ViT/DeiT with the same weights (state-dict keys equal to
timm's ``deit_*``) and the ViT argument ``ats=dict(blocks=..., max_tokens=K)``.  In each of those blocks
(:meth:`vitlab.layers.token_ops.AdaptiveTokenSampler.run_block`):

* sec. 3.2, eq. 4: a significance score per token, the class token's attention to it weighted by ``||v_j||``
  (summed over heads), from the block's own attention over its normed input;
* sec. 3.2, eq. 5-6: inverse transform sampling of the cumulative scores at ``K - 1`` evenly spaced points
  ``(2i + 1) / 2(K - 1)``; repeated samples count once, so an image keeps ``K' <= K`` tokens (class token
  included) and images of one batch keep different numbers, even with ``K = N``;
* sec. 3.1: the attention's output is kept for the sampled rows only (the class token first), and only those
  go through the MLP half and the later blocks.  The batch is padded to its largest ``K'``; the layout's
  key-padding mask keeps the padding out of every later attention, so an image's class token is the one it
  gets alone.  Sampling is the same in training and evaluation (the official code's, with no noise).

Placement and budget of the paper's DeiT-S (sec. 4.1): ATS in blocks 4-12 (indices 3..11), at most
``K = 197`` tokens, the patch tokens plus the class token.  ``ats_deit_small_patch16_224`` is that model;
with a ``depth`` override the samplers move to the last three quarters of the blocks (``depth // 4 ..``).
``ats_vit_tiny_patch4_32`` is a CIFAR-10 ViT-Ti/4 with the same rule (``K = 65``, all its tokens).

Where others differ: the official code scores with ``(sum_h A_h[0, j]) * ||v_j||`` (the norm of the value
across all heads) and picks the token whose min-max-normalised CDF is nearest to each point (points from the
smallest non-zero CDF value to 1); vit-pytorch's ``ats_vit.py`` draws the samples by Gumbel-max (random,
also at evaluation) and skips sampling in a block whose token count is already within ``K``.
"""
from __future__ import annotations

from typing import Any, Dict

from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD
from vitlab.models.base import register_recipe
from vitlab.models.vit import VisionTransformer

__all__: list = []  # recipes only: the model is vitlab.models.vit.VisionTransformer

_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)


def _register(name: str, defaults: Dict[str, Any], max_tokens: int, what: str, **cfg: Any) -> None:
    # no ``blocks``: the ViT's default placement (the paper's blocks 4-12 of 12) follows a depth override
    register_recipe(VisionTransformer, name, dict(defaults, ats=dict(max_tokens=max_tokens)),
                    f"{name}: {what} with adaptive token sampling in the last three quarters of the blocks, at most "
                    f"{max_tokens} tokens (Fayyaz et al., ECCV 2022).", **cfg)


_register("ats_deit_small_patch16_224", dict(_SMALL, patch_size=16, img_size=224), 197, "DeiT-S/16 at 224x224")
_register("ats_vit_tiny_patch4_32", dict(_TINY, patch_size=4, img_size=32, num_classes=10), 65,
          "ViT-Ti/4 at 32x32 (CIFAR-10)", mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)
