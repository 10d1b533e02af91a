"""The one staged ``Backbone`` of vitlab (DESIGN.md, "Backbones").

A model is a stem, then stages, then a head::

    stem (patch_embed)          image -> tokens (B, N, C) and their TokenLayout
    [prefix tokens, pos_embed]  class / distillation tokens join at stage ``token_stage``;
                                a model-level position table is added after the stem
    stage i                     downsample -> prefix tokens (if i == token_stage > 0) -> the stage's
                                position table -> blocks -> the stage's norm
    tail stages                 stages after the feature taps (CaiT's class-attention blocks)
    norm, pool, fc_norm, head   the final norm, token / average pooling, the classifier

Families only build their parts (stem, downsamplers, blocks, tables) under timm's attribute names and
set a few class attributes; running, feature taps, ``forward_intermediates``, ``forward_halves``,
pooling, ``feature_info``, pruning and grouping are written once, here.  The isotropic ViT is the
one-stage case (``stage_attr = "blocks"``: the one stage's blocks live in ``model.blocks`` and every
block is a feature tap, timm's rule); hierarchical models keep :class:`Stage` s in
``model.layers`` (Swin, CSwin) or ``model.stages`` (PVT, PVTv2) and tap every stage.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from vitlab.layers.layout import TokenLayout
from vitlab.layers.norm import create_norm
from vitlab.layers.token_ops import TokenSubset, patch_drop_active
from vitlab.models.base import Intermediate, VitlabModel

__all__ = ["Stage", "Backbone", "Downsample", "ConvPatchEmbed"]


class Downsample(nn.Module):
    """The downsampler protocol: ``forward(tokens, layout) -> (tokens, (h, w))`` on grid tokens (no
    prefix tokens); subclasses implement :meth:`on_map` on a ``(B, C, H, W)`` map, returning a map
    (the tokens are taken from its channels) or ``(tokens, (h, w))``.  A downsampler with ``takes_prefix = True``
    gets the prefix tokens too and returns them first, as many as it got (PiT's pooling maps them by a Linear)."""

    takes_prefix: bool = False

    def on_map(self, fm: torch.Tensor):  # pragma: no cover - per downsampler
        raise NotImplementedError

    def forward(self, x: torch.Tensor, layout: Optional[TokenLayout] = None):
        out = self.on_map(x if layout is None else layout.to_map(x))
        if isinstance(out, tuple):
            return out
        return out.flatten(2).transpose(1, 2), tuple(out.shape[-2:])


class ConvPatchEmbed(Downsample):
    """A ``kernel x kernel`` conv with ``stride`` and ``padding``, then a norm over the channels: an image
    or the previous stage's map -> ``(tokens, hw)``; CSwin's stem and merges, PVTv2's overlapping patch
    embeddings.  Names are timm's (``proj``, ``norm``)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int, padding: int,
                 norm: str = "layernorm", norm_eps: float = 1e-5):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_chans, out_chans, kernel, stride=stride, padding=padding)
        self.norm = create_norm(norm, out_chans, eps=norm_eps)

    def out_size(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in hw)  # type: ignore

    def on_map(self, x: torch.Tensor):
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


class Stage(nn.Module):
    """One stage: ``downsample`` (none for a stage that keeps the map), an optional learned position
    table ``pos_embed`` ``(1, P + h*w, dim)`` (PVT), ``blocks`` and a closing ``norm`` (PVTv2).  Absent
    parts leave no state-dict keys.  ``dim`` and ``reduction`` (input stride) describe the output;
    ``grid_size`` is its map at the model's image size.  An optional conditional position code
    ``pos_block`` (a :data:`~vitlab.layers.POS_CODES` module called as ``(x, layout)``, e.g. CPVT's and
    Twins' PEG) runs after block ``pos_block_after``."""

    def __init__(self, blocks: Sequence[nn.Module], dim: int, reduction: int, grid_size: Tuple[int, int],
                 downsample: Optional[nn.Module] = None, norm: Optional[nn.Module] = None, pos_tokens: int = 0,
                 pos_block: Optional[nn.Module] = None, pos_block_after: int = 0):
        super().__init__()
        if pos_block is not None and not 0 <= pos_block_after < len(blocks):
            raise ValueError(f"pos_block_after must index one of the stage's {len(blocks)} blocks, "
                             f"got {pos_block_after}")
        self.dim, self.reduction, self.grid_size = int(dim), int(reduction), tuple(grid_size)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_tokens, dim)) if pos_tokens else None
        self.blocks = nn.Sequential(*blocks)
        self.pos_block, self.pos_block_after = pos_block, pos_block_after
        self.norm = norm if norm is not None else nn.Identity()


class StageView(NamedTuple):
    """A stage made of modules that live elsewhere (an isotropic model's ``blocks``, CaiT's tail)."""

    downsample: Optional[nn.Module]
    pos_embed: Optional[torch.Tensor]
    blocks: nn.Module
    norm: Optional[nn.Module]


def _present(m: Optional[nn.Module]) -> bool:
    return m is not None and not isinstance(m, nn.Identity)


def _pos_block_at(stage: Any, j: int) -> bool:
    """Whether the stage's conditional position code (PEG) runs after its block ``j``."""
    return getattr(stage, "pos_block", None) is not None and j == stage.pos_block_after


class Backbone(VitlabModel):
    """The staged backbone every transformer family subclasses (see the module docstring).

    Class attributes a family sets: ``stage_attr`` (``"blocks"``: isotropic, else the attribute
    holding the stages), ``tail_attr`` (stages run after the feature taps, e.g.
    ``"blocks_token_only"``), ``prefix_names`` (the prefix-token parameters, in order),
    ``token_stage`` (the stage the prefix tokens join before), ``no_embed_class``, ``features_fmt``
    (``"NLC"`` tokens or
    ``"NCHW"`` maps from ``forward_features``), ``global_pool`` (``"token"`` | ``"avg"`` | ``"seqpool"``, the
    last with an ``attention_pool`` Linear(dim, 1)).
    Attributes the family's ``__init__`` builds: ``patch_embed`` (the stem: ``image -> tokens`` with
    ``grid_size``, or ``-> (tokens, hw)``), the stages, ``norm``; optional ``pos_embed``, ``pos_drop``,
    ``fc_norm``, ``head_drop``, ``head``.
    """

    stage_attr: str = "stages"
    tail_attr: Optional[str] = None
    prefix_names: Tuple[str, ...] = ()
    token_stage: int = 0
    features_fmt: str = "NLC"
    global_pool: str = "avg"
    stem_reduction: int = 1  # input stride of the stem (isotropic feature_info)
    no_embed_class: bool = False  # True: the model-level table is added to the patches before the prefix joins

    # -- parts --------------------------------------------------------------------------------
    def stage_list(self) -> List[Any]:
        """The stages, each with ``downsample``, ``pos_embed``, ``blocks``, ``norm`` (an isotropic model
        is one stage whose blocks are ``self.blocks``)."""
        if self.stage_attr == "blocks":
            return [StageView(None, None, self.blocks, None)]
        return list(getattr(self, self.stage_attr))

    def tail_list(self) -> List[Any]:
        """The stages after the feature taps (CaiT's class-attention blocks), like :meth:`stage_list`."""
        if self.tail_attr is None:
            return []
        return [StageView(None, None, getattr(self, self.tail_attr), None)]

    def named_stages(self) -> List[Tuple[str, str, Any]]:
        """``(stage name, prefix of its blocks' names, stage)`` for every stage, then the tail stages:
        ``("layers.1", "layers.1.blocks", ...)``; an isotropic model's one stage is ``("blocks", "blocks",
        ...)``, CaiT's tail ``("blocks_token_only", "blocks_token_only", ...)``."""
        if self.stage_attr == "blocks":
            named = [("blocks", "blocks", s) for s in self.stage_list()]
        else:
            named = [(f"{self.stage_attr}.{i}", f"{self.stage_attr}.{i}.blocks", s)
                     for i, s in enumerate(self.stage_list())]
        return named + [(self.tail_attr, self.tail_attr, s) for s in self.tail_list()]

    @property
    def num_prefix_tokens(self) -> int:
        return sum(t.shape[1] for t in (getattr(self, n, None) for n in self.prefix_names) if t is not None)

    def _join_prefix(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        toks = [getattr(self, n) for n in self.prefix_names if getattr(self, n, None) is not None]
        if not toks:
            return x, layout
        b = x.shape[0]
        return (torch.cat([t.expand(b, -1, -1) for t in toks] + [x], dim=1),
                TokenLayout(layout.grid, sum(t.shape[1] for t in toks)))

    def _add_pos(self, x: torch.Tensor, table: Optional[torch.Tensor], grid: Optional[Tuple[int, ...]] = None
                 ) -> torch.Tensor:
        """``x`` plus a learned / fixed position table, resampled first when the tokens' ``grid`` is not
        the table's (``dynamic_img_size``: bicubic, prefix rows kept, as timm does)."""
        if table is None:
            return x
        if grid is not None and tuple(grid) != tuple(self.grid_size):
            from vitlab.layers.pos_embed import resample_pos_embed

            own = tuple(self.grid_size)
            table = resample_pos_embed(table, tuple(grid), own, table.shape[1] - own[0] * own[1])
        return x + table

    def _pos_drop(self, x: torch.Tensor) -> torch.Tensor:
        drop = getattr(self, "pos_drop", None)
        return drop(x) if drop is not None else x

    # -- running --------------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, TokenLayout]:
        """Image -> the tokens the first stage reads (prefix tokens joined and the model-level position
        table added where the model does so) and their :class:`TokenLayout`; what pretraining methods
        (MAE, SimMIM, DINO) wrap, with :meth:`forward_tokens`."""
        self.check_input(x)
        out = self.patch_embed(x)
        x, hw = out if isinstance(out, tuple) else (out, self.patch_embed.grid_size)
        layout = TokenLayout(hw)
        table = hasattr(self, "pos_embed")  # a model-level table (ViT, CaiT; None for pos_embed='none')
        if table and self.no_embed_class:  # DeiT III, registers: the table covers the patches only
            x = self._add_pos(x, self.pos_embed, layout.grid)
        if self.token_stage == 0:
            x, layout = self._join_prefix(x, layout)
        if table and not self.no_embed_class:
            x = self._add_pos(x, self.pos_embed, layout.grid)
        return self._patch_drop(self._pos_drop(x) if table else x, layout)

    def _patch_drop(self, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        """timm's ``patch_drop`` (PatchDropout, Liu et al., WACV 2023) after the position table: in training a
        random subset of the patch tokens (prefix kept), laid out as a :class:`TokenSubset`."""
        drop = getattr(self, "patch_drop", None)
        if not patch_drop_active(drop):
            return x, layout
        x = drop(x)  # the kept tokens come shuffled: no grid, even when all are kept
        return x, TokenSubset.of(x.shape[1], layout.num_prefix, "patch dropout", layout.grid)

    def _feature_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, TokenLayout]:  # the contract's hook
        return self.forward_stem(x)

    def forward_tokens(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The rest of :meth:`forward_features` on stem tokens ``x`` laid out as ``layout`` (which may
        differ from the stem's, e.g. after masking): ``forward_features(img) ==
        forward_tokens(*forward_stem(img))``."""
        return self._run_units(x, layout)

    def _enter(self, i: int, stage: Any, x: torch.Tensor, layout: TokenLayout, out: Optional[list] = None,
               name: str = "") -> Tuple[torch.Tensor, TokenLayout]:
        """Stage ``i`` up to its blocks: downsample, prefix tokens joining here, its position table."""
        if _present(stage.downsample):
            x, hw = stage.downsample(x, layout)  # a TokenLayout when the prefix count changes (RegionViT's regions)
            layout = hw if isinstance(hw, TokenLayout) else TokenLayout(
                hw, layout.num_prefix if getattr(stage.downsample, "takes_prefix", False) else 0)
            if out is not None:
                out.append(self._entry(f"{name}.downsample", "downsample", x, layout, i))
        if i == self.token_stage and i > 0:
            x, layout = self._join_prefix(x, layout)
        if stage.pos_embed is not None:
            x = self._pos_drop(self._add_pos(x, stage.pos_embed))
        return x, layout

    def _run(self, i: int, stage: Any, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        x, layout = self._enter(i, stage, x, layout)
        for j, blk in enumerate(stage.blocks):
            x = self._block(blk, x, layout)
            x = stage.pos_block(x, layout) if _pos_block_at(stage, j) else x
        return (stage.norm(x) if _present(stage.norm) else x), layout

    def _feature_units(self) -> Sequence[Any]:
        return list(self.blocks) if self.stage_attr == "blocks" else self.stage_list()

    def _feature_unit(self, i: int, unit: Any, x: torch.Tensor, layout: TokenLayout):
        if self.stage_attr == "blocks":  # a token op after block i - 1 opens unit i: taps stay block outputs
            x, layout = self._after_block(i - 1, x, layout)
            return self._in_block(i, unit, x, layout)
        return self._run(i, unit, x, layout)

    # token ops run between two blocks of an isotropic model: {block index: attribute}, e.g. a PatchMerger
    after_block: Dict[int, str] = {}

    def _after_block(self, i: int, x: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, TokenLayout]:
        name = self.after_block.get(i)
        return getattr(self, name)(x, layout) if name is not None else (x, layout)

    # token ops that run a block of an isotropic model themselves, as they read its input and attention:
    # {block index: submodule name}, e.g. adaptive token sampling ("ats.0", ...)
    in_block: Dict[int, str] = {}

    def _in_block(self, i: int, blk: nn.Module, x: torch.Tensor, layout: TokenLayout
                  ) -> Tuple[torch.Tensor, TokenLayout]:
        """Block ``i`` (checkpointed by :meth:`_block`), or ``op.run_block(blk, x, layout) -> (x, layout)`` of the
        token op ``in_block[i]`` (not checkpointed)."""
        name = self.in_block.get(i)
        if name is None:
            return self._block(blk, x, layout), layout
        return self.get_submodule(name).run_block(blk, x, layout)

    def _feature_end(self, x: torch.Tensor, layout: TokenLayout, complete: bool) -> torch.Tensor:
        if not complete and self.stage_attr != "blocks":  # a hierarchical model stopped early: no final norm
            return layout.to_map(x) if self.features_fmt == "NCHW" else x
        n = 1 if self.stage_attr == "blocks" else len(getattr(self, self.stage_attr))
        for k, stage in enumerate(self.tail_list() if complete else ()):
            x, layout = self._run(n + k, stage, x, layout)
        x = self._final_norm(x)
        return layout.to_map(x) if self.features_fmt == "NCHW" else x

    # -- the analyses' view ----------------------------------------------------------------------
    def _entry(self, name: str, kind: str, x: torch.Tensor, layout: TokenLayout, stage: int) -> Intermediate:
        p = layout.num_prefix
        return Intermediate(name, kind, layout.to_map(x), x[:, :p] if p else None, stage)

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:
        """The stem (``embed``), then per stage its downsampler, every block's attention and MLP
        halves and the stage norm (then the tail stages; a staged model's final norm last), each an
        :class:`Intermediate` with a ``(B, C, H, W)`` map and the prefix tokens apart."""
        x, layout = self.forward_stem(x)
        out = [self._entry("patch_embed", "embed", x, layout, 0)]
        named = self.named_stages()
        for i, (name, prefix, stage) in enumerate(named):
            x, layout = self._enter(i, stage, x, layout, out, name)
            for j, blk in enumerate(stage.blocks):
                if self.stage_attr == "blocks" and j in self.in_block:  # token sampling inside: no map after it
                    x, layout = self._in_block(j, blk, x, layout)
                    out.append(self._entry(f"{prefix}.{j}", "block", x, layout, i))
                    continue
                x = blk.attn_half(x, layout)
                if getattr(blk, "fused_halves", False):  # no separable halves: one entry
                    out.append(self._entry(f"{prefix}.{j}", "block", x, layout, i))
                else:
                    out.append(self._entry(f"{prefix}.{j}.attn", "attn", x, layout, i))
                    x = blk.mlp_half(x, layout)
                    out.append(self._entry(f"{prefix}.{j}.mlp", "mlp", x, layout, i))
                if _pos_block_at(stage, j):  # a conditional position code (PEG) after this block
                    x = stage.pos_block(x, layout)
                    out.append(self._entry(f"{name}.pos_block", "position", x, layout, i))
                if self.stage_attr == "blocks" and j in self.after_block:  # a PatchMerger: its map refuses
                    x, layout = self._after_block(j, x, layout)
                    out.append(self._entry(self.after_block[j], "downsample", x, layout, i))
            if _present(stage.norm):
                x = stage.norm(x)
                out.append(self._entry(f"{name}.norm", "norm", x, layout, i))
        if self.stage_attr != "blocks" and _present(getattr(self, "norm", None)):  # what a staged head reads
            out.append(self._entry("norm", "norm", self.norm(x), layout, len(named) - 1))
        return out

    # -- head -------------------------------------------------------------------------------------
    _global_pools = ("token", "avg", "seqpool")

    def _set_global_pool(self, global_pool: str) -> None:
        super()._set_global_pool(global_pool)
        if global_pool == "token" and self.num_prefix_tokens == 0:
            raise ValueError("global_pool='token' needs a class token; this model has none")
        if global_pool != "token" and self.in_block:  # padded rows after token sampling: the class token pools
            raise ValueError(f"global_pool={global_pool!r} would pool the padding of adaptive token sampling; use "
                             "global_pool='token'")
        if global_pool == "seqpool" and getattr(self, "attention_pool", None) is None:
            raise ValueError("global_pool='seqpool' needs an attention_pool Linear(dim, 1); build the model with "
                             "global_pool='seqpool'")
        self.global_pool = global_pool

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "seqpool":  # CCT (Hassani et al., 2021, sec. 3.2): softmax(g(x))^T x, all tokens
            x = x.flatten(2).transpose(1, 2) if x.ndim == 4 else x
            return (self.attention_pool(x).softmax(dim=1).transpose(1, 2) @ x).squeeze(1)
        if x.ndim == 4:  # a (B, C, H, W) map
            return x.mean(dim=(-2, -1))
        return x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self._pool(x)
        fc_norm, drop = getattr(self, "fc_norm", None), getattr(self, "head_drop", None)
        x = fc_norm(x) if fc_norm is not None else x
        x = drop(x) if drop is not None else x
        return x if pre_logits else self.head(x)

    # -- contract details -----------------------------------------------------------------------
    def _feature_info(self) -> List[Dict[str, Any]]:
        if self.stage_attr == "blocks":
            return [dict(num_chs=self.embed_dim, reduction=self.stem_reduction, module=f"blocks.{i}")
                    for i in range(len(self.blocks))]
        return [dict(num_chs=s.dim, reduction=s.reduction, module=f"{self.stage_attr}.{i}")
                for i, s in enumerate(self.stage_list())]

    def _truncate_units(self, n: int) -> None:
        setattr(self, self.stage_attr, getattr(self, self.stage_attr)[:n])

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping: the stem (tokens, position table, patch embedding); then one group per
        block of an isotropic model, or per stage (coarse) / per block with each stage's downsampler
        joining its first block (fine) of a hierarchical one; the final norm last."""
        if self.stage_attr == "blocks":
            return dict(stem=r"^cls_token|dist_token|reg_token|pos_embed|patch_embed",
                        blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])
        s = self.stage_attr
        return dict(stem=r"^patch_embed|^pos_embed|^cls_token", blocks=rf"^{s}\.(\d+)" if coarse else [
            (rf"^{s}\.(\d+)\.(?:downsample|pos_embed|pos_block)", (0,)), (rf"^{s}\.(\d+)\.\w+\.(\d+)", None),
            (r"^norm", (99999,))])
