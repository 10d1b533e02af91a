"""NaViT: "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution" (Dehghani et al.,
NeurIPS 2023), on vitlab's one :class:`~vitlab.models.block.Block`.

* Images of any size (each side divisible by the patch) are cut into patches at their own resolution and the
  patches of several images are **packed** into sequences of one fixed length, first fit (sec. 2.3, "Packing":
  a greedy packer; :func:`pack_images`).
* A **block-diagonal mask** keeps every token inside its own image (sec. 2.1, "Masked self attention"); it is
  the layout's ``mask`` (:class:`~vitlab.layers.TokenLayout`), so it reaches every attention call through the
  unchanged Block.  Padding tokens attend to padding only, so no row of the mask is empty.
* **Factorised position embeddings** (sec. 2.1): learned row and column tables indexed by the patch's absolute
  coordinates and summed (the paper's "absolute" variant; the "fractional" one is not implemented).
* **Continuous token dropping** (sec. 2.2): a rate per image (a float, or a callable ``(h, w) -> rate``), in
  training only, before packing, so dropped tokens free room in the sequences.
* **Masked attention pooling** (sec. 2.1, "masked pooling"): one learned query per image attends to that
  image's tokens only (:class:`AttentionPool`); one prediction per image, in input order.

Inputs: a ``(B, C, H, W)`` batch (one image per sequence, no mask: a plain ViT with these embeddings), a list
of ``(C, H, W)`` images (packed here) or a :class:`PackedBatch` (:mod:`vitlab.data.packing`'s collate).
``forward_head(features, batch=...)`` pools per image; without ``batch`` each row is one image.

Names are timm's ``naflexvit`` (the nearest model timm has; ``pos_embed='factorized', global_pool='map'``):
``embeds.proj`` (a Linear on patches flattened as ``(ph, pw, C)``), ``embeds.pos_embed_y`` / ``pos_embed_x``,
``blocks.*``, ``norm``, ``attn_pool.{latent, q, kv, proj, norm, mlp}``, ``head``.

Where vit-pytorch's ``na_vit.py`` differs: it packs next-fit (a new sequence whenever the next image does not
fit), adds LayerNorms before and after the patch projection, uses bias-free LayerNorms and Linears and RMS
qk-norm (ViT-22B's choices), pools with a residual from the query and no MLP, and gives padding tokens image
id 0 (they attend to the first image).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vitlab.layers import Mlp, MixerSpec, TokenLayout, create_norm, init_weights, to_2tuple
from vitlab.layers.attention_pool import AttentionPool
from vitlab.models.backbone import Backbone
from vitlab.models.base import make_default_cfg, register_recipe
from vitlab.models.block import Block, drop_path_rates

__all__ = ["NaViT", "PackedBatch", "AttentionPool", "pack_images", "first_fit", "patchify"]

TokenDrop = Union[float, Callable[[int, int], float]]


# -- packing (here, not in vitlab.data: the model packs a list of images itself) -----------------------------
def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, h*w, p*p*C)`` patches in raster order, each flattened as ``(ph, pw, C)``."""
    b, c, hh, ww = x.shape
    h, w = hh // patch, ww // patch
    return x.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch * patch * c)


def grid_positions(h: int, w: int, device=None) -> torch.Tensor:
    """``(h*w, 2)`` (row, column) of the patches of an ``h x w`` grid, raster order."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    return torch.stack([rows, torch.arange(w, device=device).repeat(h)], dim=-1)


def first_fit(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Greedy first-fit bin packing: item ``i`` goes to the first sequence with ``lengths[i]`` free places,
    else opens a new one.  Returns the items of each sequence, in order."""
    bins: List[List[int]] = []
    free: List[int] = []
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has {n} tokens; a packed sequence holds 1 to {capacity} (max_len)")
        b = next((j for j, room in enumerate(free) if n <= room), len(bins))
        if b == len(bins):
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= n
    return bins


@dataclass
class PackedBatch:
    """Images packed into ``S`` sequences of ``L`` tokens.  ``patches (S, L, p*p*C)``; ``image_ids (S, L)``:
    the slot of each token's image within its sequence, -1 for padding; ``positions (S, L, 2)``: its (row,
    column) in its image's patch grid; ``index (I, 2)``: (sequence, slot) of input image ``i``; ``grids``: each
    image's patch grid; ``labels``: ``(I,)`` or None."""

    patches: torch.Tensor
    image_ids: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    grids: List[Tuple[int, int]]
    labels: Optional[torch.Tensor] = None

    @property
    def num_images(self) -> int:
        return self.index.shape[0]

    @property
    def num_slots(self) -> int:
        """The most images any one sequence holds."""
        return int(self.index[:, 1].max()) + 1 if self.num_images else 0

    def attention_mask(self) -> torch.Tensor:
        """``(S, L, L)`` boolean block-diagonal mask: ``True`` where query and key belong to one image (padding
        tokens form one more block, so no row is empty)."""
        return self.image_ids[:, :, None] == self.image_ids[:, None, :]

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, patches=move(self.patches), image_ids=move(self.image_ids),
                       positions=move(self.positions), index=move(self.index), labels=move(self.labels))


def _image_tokens(img: torch.Tensor, patch: int, rate: float, generator) -> Tuple[torch.Tensor, torch.Tensor]:
    if img.ndim != 3 or img.shape[-2] % patch or img.shape[-1] % patch:
        raise ValueError(f"NaViT needs (C, H, W) images with H and W divisible by the patch size {patch}, "
                         f"got shape {tuple(img.shape)}")
    h, w = img.shape[-2] // patch, img.shape[-1] // patch
    tokens, pos = patchify(img[None], patch)[0], grid_positions(h, w, img.device)
    if rate > 0:  # continuous token dropping (sec. 2.2): a random subset, at least one token
        keep = max(1, round(h * w * (1.0 - rate)))
        idx = torch.randperm(h * w, generator=generator)[:keep].sort().values.to(img.device)
        tokens, pos = tokens[idx], pos[idx]
    return tokens, pos


def pack_images(images: Sequence[torch.Tensor], patch_size: int, max_len: int, token_drop: TokenDrop = 0.0,
                labels: Optional[torch.Tensor] = None,
                generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None) -> PackedBatch:
    """Patchify ``(C, H, W)`` images of any sizes, drop tokens (``token_drop``: a rate or ``(h, w) -> rate``;
    ``generator``: one, or one per image) and pack them first fit into sequences of ``max_len`` tokens (NaViT,
    sec. 2.3)."""
    if not len(images):
        raise ValueError("pack_images needs at least one image, got an empty list")
    toks, poss, grids = [], [], []
    for k, img in enumerate(images):
        h, w = img.shape[-2] // patch_size, img.shape[-1] // patch_size
        rate = float(token_drop(h * patch_size, w * patch_size) if callable(token_drop) else token_drop)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"token_drop must give a rate in [0, 1), got {rate} for a {h}x{w} patch grid")
        t, p = _image_tokens(img, patch_size, rate, generator[k] if isinstance(generator, (list, tuple)) else generator)
        toks.append(t), poss.append(p), grids.append((h, w))
    bins = first_fit([t.shape[0] for t in toks], max_len)
    ref = toks[0]
    patches = ref.new_zeros(len(bins), max_len, ref.shape[1])
    ids = torch.full((len(bins), max_len), -1, dtype=torch.long, device=ref.device)
    pos = torch.zeros(len(bins), max_len, 2, dtype=torch.long, device=ref.device)
    index = torch.zeros(len(images), 2, dtype=torch.long, device=ref.device)
    for s, members in enumerate(bins):
        start = 0
        for slot, i in enumerate(members):
            end = start + toks[i].shape[0]
            patches[s, start:end], pos[s, start:end], ids[s, start:end] = toks[i], poss[i], slot
            index[i] = torch.tensor([s, slot])
            start = end
    return PackedBatch(patches, ids, pos, index, grids, labels)


# -- the model's parts -----------------------------------------------------------------------------------------
class FactorizedEmbed(nn.Module):
    """Patch projection ``proj`` plus factorised learned position embeddings: ``pos_embed_y[row] +
    pos_embed_x[col]`` (NaViT, sec. 2.1), tables ``(1, rows, dim)`` / ``(1, cols, dim)`` of the largest grid."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, max_grid: Tuple[int, int]):
        super().__init__()
        self.patch_size, self.max_grid = patch_size, tuple(max_grid)
        self.proj = nn.Linear(patch_size * patch_size * in_chans, dim)
        self.pos_embed_y = nn.Parameter(torch.zeros(1, max_grid[0], dim))
        self.pos_embed_x = nn.Parameter(torch.zeros(1, max_grid[1], dim))

    def check_grid(self, h: int, w: int) -> None:
        if h > self.max_grid[0] or w > self.max_grid[1]:
            raise ValueError(f"a {h}x{w} patch grid exceeds the position tables ({self.max_grid[0]}x"
                             f"{self.max_grid[1]}); build the model with a larger max_img_size")

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(B, N, p*p*C)`` patches at ``(N, 2)`` or ``(B, N, 2)`` (row, column) -> ``(B, N, dim)``."""
        return self.proj(patches) + self.pos_embed_y[0, positions[..., 0]] + self.pos_embed_x[0, positions[..., 1]]


# -- the model ---------------------------------------------------------------------------------------------------
class NaViT(Backbone):
    """NaViT (see the module docstring).  Args beyond ViT's sizes: ``max_img_size`` (the largest image side,
    or (height, width): sizes the position tables; default ``img_size``), ``max_len`` (tokens per packed sequence when the model
    packs a list itself; default one largest image), ``token_drop`` (a rate or ``(H, W) -> rate``, training
    only), ``mixer`` / ``core`` / ``modifiers`` / ``attn_position`` (``("rope",)`` on ``(B, C, H, W)`` batches
    only: packed rows have no common grid) / ``mixer_kwargs`` (any attention that takes a mask, e.g.
    ``mixer_kwargs=dict(qk_norm=True)``), ``norm``, ``init``, and the Block's ``branch_scale`` /
    ``shortcut_init``, ``featscale``, ``wiring`` as in every family."""

    stage_attr = "blocks"
    packs = True  # capability: trainers feed it PackedBatch inputs of native-size images (vitlab.data.packing)
    global_pool = "map"
    _global_pools = ("map",)
    _no_weight_decay_keys = ("pos_embed", "latent")

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, max_img_size: Union[None, int, Tuple[int, int]] = None,
                 max_len: Optional[int] = None,
                 token_drop: TokenDrop = 0.0, mixer: str = "softmax", core: Optional[str] = None,
                 modifiers: Sequence[str] = (), attn_position: Sequence[Any] = (),
                 mixer_kwargs: Optional[Dict[str, Any]] = None,
                 norm: str = "layernorm", norm_eps: float = 1e-6, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, init: str = "trunc_normal", branch_scale: str = "plain",
                 shortcut_init: Optional[float] = None, featscale: bool = False, wiring: str = "pre",
                 architecture: str = "navit",
                 default_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        max_img_size = to_2tuple(max_img_size or img_size)
        if depth < 1 or embed_dim < 1 or num_heads < 1 or patch_size < 1 or min(max_img_size) < patch_size:
            raise ValueError(f"depth, embed_dim, num_heads, patch_size must be positive and max_img_size >= patch_size;"
                             f" got {depth}, {embed_dim}, {num_heads}, {patch_size}, {max_img_size}")
        if not callable(token_drop) and not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1) or a callable (H, W) -> rate, got {token_drop}")
        spec = MixerSpec(mixer, core, tuple(modifiers), dict(mixer_kwargs or {}), attn_position)
        spec.check_grid(TokenLayout((1,)))  # packed sequences have no 2-D map to convolve or pool
        core_part = spec.core_part
        if core_part is None or not core_part.takes_bias:
            raise ValueError(f"NaViT masks attention between packed images; mixer {mixer!r} / core {core!r} takes no "
                             "attention mask (use a softmax-family attention: softmax, cosine, attnscale)")
        self.num_classes, self.in_chans, self.patch_size = num_classes, in_chans, patch_size
        self.num_features = self.embed_dim = embed_dim
        self.stem_reduction, self.token_drop = patch_size, token_drop
        grid = tuple(s // patch_size for s in max_img_size)
        self.grid_size = (img_size // patch_size,) * 2
        self.max_len = max_len or grid[0] * grid[1]
        self.max_img_size = (grid[0] * patch_size, grid[1] * patch_size)  # largest image the position tables take
        self.embeds = FactorizedEmbed(patch_size, in_chans, embed_dim, grid)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, spec.build(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                        proj_drop=drop_rate),
                  Mlp(embed_dim, int(embed_dim * mlp_ratio), drop=drop_rate), norm=norm, norm_eps=norm_eps,
                  drop_path=dpr[i], branch_scale=branch_scale, branch_scale_init=shortcut_init, total_depth=depth,
                  featscale=featscale, wiring=wiring) for i in range(depth)])
        self.norm = create_norm(norm, embed_dim, eps=norm_eps)
        self.attn_pool = AttentionPool(embed_dim, num_heads, mlp_ratio, norm, norm_eps, qkv_bias)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(init)
        self.default_cfg = default_cfg or make_default_cfg(architecture, img_size, num_classes, in_chans)

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        init_weights(self, init)
        nn.init.normal_(self.embeds.pos_embed_y, std=0.02)  # timm's factorised tables
        nn.init.normal_(self.embeds.pos_embed_x, std=0.02)
        nn.init.trunc_normal_(self.attn_pool.latent, std=self.embed_dim ** -0.5)  # timm's MAP latent

    # -- inputs ----------------------------------------------------------------------------------------
    def pack(self, images: Sequence[torch.Tensor], labels: Optional[torch.Tensor] = None) -> PackedBatch:
        """A list of ``(C, H, W)`` images packed into ``max_len`` sequences (tokens dropped in training)."""
        for img in images:
            if img.ndim != 3 or img.shape[0] != self.in_chans:
                raise ValueError(f"expected (C, H, W) images with C = {self.in_chans}, got shape {tuple(img.shape)}")
        return pack_images(images, self.patch_size, self.max_len, self.token_drop if self.training else 0.0, labels)

    def _as_input(self, x: Any) -> Any:
        """A list, or a batch to drop tokens from, as a :class:`PackedBatch`; other inputs unchanged."""
        if isinstance(x, (list, tuple)) or (torch.is_tensor(x) and self.training and self.token_drop):
            return self.pack(list(x))
        return x

    def forward_stem(self, x: Any) -> Tuple[torch.Tensor, TokenLayout]:
        """Images -> embedded tokens and their layout: a ``(B, C, H, W)`` batch gives one image per row and
        its grid; a list or a :class:`PackedBatch` gives packed rows, a 1-D layout and the block-diagonal mask."""
        if torch.is_tensor(x):
            self.check_input(x)
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
                raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}")
            self.embeds.check_grid(h, w)
            tokens = self.embeds(patchify(x, self.patch_size), grid_positions(h, w, x.device))
            return self.pos_drop(tokens), TokenLayout((h, w))
        batch = x if isinstance(x, PackedBatch) else self.pack(list(x))
        for h, w in batch.grids:
            self.embeds.check_grid(h, w)
        layout = TokenLayout((batch.patches.shape[1],), mask=batch.attention_mask())
        return self.pos_drop(self.embeds(batch.patches, batch.positions)), layout

    # -- head and forward ----------------------------------------------------------------------------------
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, batch: Optional[PackedBatch] = None
                     ) -> torch.Tensor:
        """Masked attention pooling per image -> ``(I, num_classes)`` in input order.  ``batch``: the
        :class:`PackedBatch` the features ``x (S, L, C)`` came from; None: each row of ``x`` is one image."""
        if batch is None:
            pooled = self.attn_pool(x, x.new_zeros(x.shape[:2], dtype=torch.long), 1)[:, 0]
        else:
            pooled = self.attn_pool(x, batch.image_ids, batch.num_slots)[batch.index[:, 0], batch.index[:, 1]]
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Any) -> torch.Tensor:
        """``(B, C, H, W)``, a list of ``(C, H, W)`` images or a :class:`PackedBatch` -> one prediction per image."""
        x = self._as_input(x)
        return self.forward_head(self.forward_features(x), batch=x if isinstance(x, PackedBatch) else None)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^embeds", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


# -- registered recipes: ViT sizes (Dosovitskiy et al., 2021), as the paper's NaViT-S/B ------------------------------
from vitlab.constants import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

_SIZES = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
          "base": dict(embed_dim=768, depth=12, num_heads=12), "large": dict(embed_dim=1024, depth=24, num_heads=16)}

for _size in ("small", "base", "large"):
    register_recipe(NaViT, f"navit_{_size}_patch16", dict(_SIZES[_size], patch_size=16, img_size=224,
                                                          max_img_size=512, max_len=1024),
                    f"NaViT-{_size[0].upper()}/16: ViT-{_size[0].upper()} sizes, images up to 512 px a side, packed into "
                    "sequences of 1024 tokens.", fixed_input_size=False)
register_recipe(NaViT, "navit_tiny_patch4", dict(_SIZES["tiny"], patch_size=4, img_size=32, max_img_size=64,
                                                 max_len=256, num_classes=10),
                "NaViT-Ti/4 for CIFAR-size images (up to 64 px a side, sequences of 256 tokens).",
                mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0, fixed_input_size=False)
