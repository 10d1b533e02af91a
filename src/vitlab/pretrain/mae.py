"""MAE: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022).

Built on the model contract only (reference: facebookresearch/mae, ``models_mae.py``):

* the encoder's stem (``forward_stem``: patch embedding, position table, prefix tokens) runs on the
  whole image; a per-sample random subset of ``int(L * (1 - mask_ratio))`` patch tokens is kept
  (argsort of uniform noise) and the encoder's blocks run on the prefix tokens plus the kept ones,
  laid out as a 1-D ``TokenLayout((kept,), prefix)`` (``forward_tokens``);
* a light decoder of its own width and depth (vitlab's ``Block``, softmax attention and ``Mlp``)
  reads the encoded tokens, a shared learned mask token in every removed place (the order restored
  by the inverse permutation), and fixed 2-D sine-cosine positions (``sincos_2d``; zero for prefix
  tokens), and predicts each patch's pixels with one linear layer;
* the loss is the mean squared error per patch, averaged over the removed patches only; with
  ``norm_pix_loss`` the target of each patch is its pixels normalised by the patch's own mean and
  (unbiased) variance, ``(x - mean) / sqrt(var + 1e-6)``.

An encoder that cannot drop tokens (windowed attention, spatial reduction, depthwise convolutions,
per-stage position tables, a hierarchical layout) or whose stem lets a pixel reach another patch's
token (an overlapping conv stem would leak removed pixels into kept tokens) is refused by
:func:`check_token_dropping`, which names SimMIM as the alternative.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from vitlab.errors import UserError
from vitlab.layers import Mlp, TokenLayout, create_mixer, init_weights, sincos_2d
from vitlab.models.backbone import Backbone
from vitlab.models.block import Block
from vitlab.pretrain.masking import check_ratio, patchify, random_masking, restore_order

__all__ = ["MAE", "check_token_dropping", "mae_loss", "pixel_target"]

ALTERNATIVE = "use --method simmim instead (it keeps every token, so it works on any backbone)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@torch.no_grad()
def _leaking_tokens(encoder: nn.Module, x: torch.Tensor, tokens: torch.Tensor, layout: TokenLayout) -> int:
    """How many patch tokens other than the first change when only the first patch's pixels change."""
    h, w = layout.hw
    sy, sx = x.shape[-2] // h, x.shape[-1] // w
    x2 = x.clone()
    x2[..., :sy, :sx] += 1.0
    t2, _ = encoder.forward_stem(x2)
    p = layout.num_prefix
    diff = (t2[:, p:] - tokens[:, p:]).abs().amax(dim=(0, 2))
    return int((diff[1:] > 1e-6 * (1 + tokens.abs().max())).sum())


def refuse_leaking_stem(encoder: nn.Module, method: str, name: str, img_size: int, in_chans: int) -> TokenLayout:
    """The stem's token layout, or a one-line refusal when the stem mixes neighbouring patches (an
    overlapping conv: corrupted or hidden pixels would reach other tokens, padding marks the border)."""
    was = encoder.training
    with torch.no_grad():
        x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
        tokens, layout = encoder.eval().forward_stem(x)
        leaks = _leaking_tokens(encoder, x, tokens, layout) if len(layout.grid) == 2 else 1
    encoder.train(was)
    if leaks:
        raise UserError(f"{method} cannot pretrain model {name}: its stem mixes neighbouring patches; use a patchify "
                        f"stem (--model-kwargs ...,embed=patch) or --method simmim")
    return layout


def check_token_dropping(encoder: nn.Module, name: str, img_size: int, in_chans: int) -> TokenLayout:
    """Refuse (one-line :class:`UserError` naming SimMIM) an encoder MAE cannot use; returns the
    stem's layout.  Checks, on a dry run in eval mode: a :class:`Backbone`, isotropic, its blocks run
    on a 1-D layout of a quarter of the tokens, and no pixel reaches another patch's stem token."""
    if not isinstance(encoder, Backbone):
        raise UserError(f"MAE needs a transformer backbone (forward_stem / forward_tokens); model {name} is not "
                        f"one (nor can SimMIM or DINO's local crops use it)")
    was = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
            tokens, layout = encoder.forward_stem(x)
            if not encoder.is_isotropic or len(layout.grid) != 2:
                raise UserError(f"MAE cannot pretrain model {name}: it is hierarchical (its stages need the whole "
                                f"token map, so the encoder cannot drop masked tokens); {ALTERNATIVE}")
            p, keep = layout.num_prefix, max(1, layout.num_grid // 4)
            try:
                encoder.forward_tokens(tokens[:, :p + keep], TokenLayout((keep,), p))
            except Exception as exc:  # a part that needs the 2-D map
                raise UserError(f"MAE cannot pretrain model {name}: its blocks cannot run on a subset of the tokens "
                                f"({_first_line(exc)}); {ALTERNATIVE}") from None
            leaks = _leaking_tokens(encoder, x, tokens, layout)
            if leaks:
                raise UserError(f"MAE cannot pretrain model {name}: its stem is overlapping (a patch's pixels reach "
                                f"{leaks} other tokens, so removed pixels would leak into kept tokens); use a "
                                f"patchify stem (e.g. --model-kwargs ...,embed=patch) or {ALTERNATIVE}")
            return layout
    finally:
        encoder.train(was)


def pixel_target(imgs: torch.Tensor, patch: int, norm_pix_loss: bool) -> torch.Tensor:
    """The per-patch regression target ``(B, L, p*p*C)``."""
    target = patchify(imgs, patch)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over removed patches (``mask == 1``) of the per-patch mean squared error."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """Embedding, mask token, fixed sin-cos positions, ``depth`` blocks, norm and pixel predictor."""

    def __init__(self, in_dim: int, grid: Tuple[int, int], num_prefix: int, out_dim: int, dim: int = 64,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0, head_dim: Optional[int] = None):
        super().__init__()
        if dim % 4 or (head_dim is None and dim % num_heads):
            raise UserError(f"--decoder-dim {dim}: expected a multiple of 4 and of --decoder-heads {num_heads} "
                            "(or set --decoder-head-dim)")
        if head_dim is not None and head_dim < 1:
            raise UserError(f"--decoder-head-dim {head_dim}: expected a positive width per head")
        self.grid, self.num_prefix = tuple(grid), int(num_prefix)
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = torch.cat([torch.zeros(self.num_prefix, dim), sincos_2d(self.grid, dim)])
        self.register_buffer("decoder_pos_embed", table[None], persistent=False)
        self.decoder_blocks = nn.ModuleList([
            Block(dim, create_mixer("softmax", dim, num_heads, family=dict(qkv_bias=True, head_dim=head_dim)),
                  Mlp(dim, int(dim * mlp_ratio)), norm="layernorm", norm_eps=1e-6) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, out_dim)
        self._init()

    def _init(self) -> None:  # as the reference: N(0, 0.02) mask token, xavier-uniform linears, zero biases
        nn.init.normal_(self.mask_token, std=0.02)
        init_weights(self, "xavier")  # (the LayerNorms are built as ones / zeros)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded ``(B, P + K, C_enc)`` -> predictions ``(B, L, out_dim)`` in the original order."""
        x = self.decoder_embed(x)
        p = self.num_prefix
        b, length = x.shape[0], ids_restore.shape[1]
        masks = self.mask_token.expand(b, length - (x.shape[1] - p), -1)
        grid = restore_order(torch.cat([x[:, p:], masks], dim=1), ids_restore)
        x = torch.cat([x[:, :p], grid], dim=1) + self.decoder_pos_embed
        layout = TokenLayout(self.grid, p)
        for blk in self.decoder_blocks:
            x = blk(x, layout)
        return self.decoder_pred(self.decoder_norm(x))[:, p:]


class MAE(nn.Module):
    """Encoder (any token-dropping :class:`Backbone`) + :class:`MAEDecoder`; ``forward(imgs, epoch)``
    returns the loss; ``last`` holds the prediction, target and mask of the latest call."""

    def __init__(self, encoder: nn.Module, name: str, img_size: int, in_chans: int, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = False, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
                 decoder_head_dim: Optional[int] = None):
        super().__init__()
        layout = check_token_dropping(encoder, name, img_size, in_chans)
        self.encoder = encoder
        self.mask_ratio = check_ratio(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.grid, self.patch, self.in_chans = layout.hw, img_size // layout.hw[0], in_chans
        if int(layout.num_grid * (1 - self.mask_ratio)) < 1:
            raise UserError(f"--mask-ratio {mask_ratio}: keeps no token of the {layout.num_grid} patches "
                            f"(int(L * (1 - ratio)) = 0); use a smaller ratio")
        self.decoder = MAEDecoder(encoder.num_features, self.grid, encoder.num_prefix_tokens,
                                  self.patch ** 2 * in_chans, decoder_dim, decoder_depth, decoder_heads,
                                  head_dim=decoder_head_dim)
        self.last: Dict[str, torch.Tensor] = {}

    def encode(self, imgs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoded prefix + kept tokens, the mask (1 = removed) and the restoring permutation."""
        tokens, layout = self.encoder.forward_stem(imgs)
        p = layout.num_prefix
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], layout.num_grid, self.mask_ratio, imgs.device)
        kept = torch.gather(tokens[:, p:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([tokens[:, :p], kept], dim=1)
        return self.encoder.forward_tokens(x, TokenLayout((ids_keep.shape[1],), p)), mask, ids_restore

    def forward(self, imgs: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        latent, mask, ids_restore = self.encode(imgs)
        pred = self.decoder(latent, ids_restore)
        target = pixel_target(imgs, self.patch, self.norm_pix_loss)
        self.last = dict(pred=pred.detach(), target=target, mask=mask)
        return mae_loss(pred.float(), target.float(), mask)
