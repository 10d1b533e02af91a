"""The model contract shared by every vitlab backbone (timm's, plus what a lab needs).

Training, analysis and interop use only this surface:

* ``forward(x) -> logits``, ``forward_features(x)``, ``forward_head(features, pre_logits=False)``
* ``forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=False,
  stop_early=False)`` and ``prune_intermediate_layers(indices, prune_norm, prune_head)`` with timm's
  meaning: the feature taps are the blocks of an isotropic model (ViT, DeiT, CaiT's self-attention
  blocks) and the stages of a hierarchical one (Swin, CSwin, PVT, PVTv2; ResNets: stem + 4 stages);
  ``feature_info`` lists them (``num_chs``, ``reduction``, ``module``)
* ``forward_halves(x) -> list[Intermediate]``: every block's attention half and MLP half (plus the
  embedding, downsamplers and norms) as spatial maps -- the analyses' view of a model
* attention probabilities through :func:`vitlab.layers.record_attention` (a context manager)
* ``pretrained_cfg`` (``default_cfg`` is an alias), ``group_matcher(coarse=False)`` (timm's
  grouping, for layer-wise lr decay), ``no_weight_decay()``, ``set_grad_checkpointing()``,
  ``reset_classifier(num_classes, global_pool=None)``, ``get_classifier()``
* ``check_input(x)``: a clear error for a wrong channel count or image size

The transformer families get these hooks from the one staged :class:`~vitlab.models.backbone.Backbone`;
the convolutional ResNets implement them directly.  The hooks, run here once for every model:
``_feature_stem(x) -> (x, layout)``, ``_feature_units()`` (the tap modules, in order),
``_feature_unit(i, unit, x, layout) -> (x, layout)`` (running blocks through :meth:`_block`, which
checkpoints them) and ``_feature_info()``; ``layout`` is a :class:`TokenLayout` for tokens or None
for a ``(B, C, H, W)`` map.  ``_final_norm`` and ``_feature_end`` have defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.constants import IMAGENET_MEAN, IMAGENET_STD
from vitlab.layers.layout import TokenLayout

__all__ = ["Intermediate", "VitlabModel", "IMAGENET_MEAN", "IMAGENET_STD", "feature_take_indices"]

OUTPUT_FMTS = ("NCHW", "NLC")


@dataclass
class Intermediate:
    """One entry of :meth:`VitlabModel.forward_halves`.

    ``feature`` is always a spatial map ``(B, C, H, W)`` (class/distillation tokens removed;
    they are kept in ``prefix`` as ``(B, P, C)``).  ``kind`` says what produced it:
    ``"embed"`` (patch embedding / stem), ``"attn"`` (after an attention residual),
    ``"mlp"`` (after an MLP residual), ``"conv"`` (a convolutional block),
    ``"block"`` (a whole block when halves are not separable), ``"downsample"`` (patch merging
    or a strided stage transition) or ``"norm"``.  ``stage`` is the stage index (0 for
    isotropic models).
    """

    name: str
    kind: str
    feature: torch.Tensor
    prefix: Optional[torch.Tensor] = None
    stage: int = 0

    @property
    def spatial_shape(self) -> Tuple[int, int]:
        return tuple(self.feature.shape[-2:])  # type: ignore[return-value]

    @property
    def tokens(self) -> torch.Tensor:
        """Patch tokens ``(B, H*W, C)`` in raster order."""
        return self.feature.flatten(2).transpose(1, 2)

    @property
    def all_tokens(self) -> torch.Tensor:
        """Prefix tokens followed by patch tokens ``(B, P + H*W, C)``."""
        if self.prefix is None:
            return self.tokens
        return torch.cat([self.prefix, self.tokens], dim=1)


def tokens_to_map(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens -> ``(B, C, H, W)`` map."""
    b, n, c = tokens.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"cannot reshape {n} tokens to a {h}x{w} map")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def feature_take_indices(num: int, indices: Union[None, int, Sequence[int]] = None) -> Tuple[List[int], int]:
    """timm's rule: ``None`` -> all ``num`` taps, an int ``n`` -> the last ``n``, a sequence -> those
    indices (negative from the end).  Returns ``(indices, max index)``; out of range raises."""
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"last-n indices={indices} is out of range: this model has {num} feature taps")
        take = list(range(num - indices, num))
    else:
        take = [num + i if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < num]
        if bad or not take:
            raise ValueError(f"feature indices {list(indices)} out of range: this model has {num} feature taps "
                             f"(0..{num - 1})")
    return take, max(take)


class VitlabModel(nn.Module):
    """Base class: ``pretrained_cfg`` and the shared parts of the contract (module docstring)."""

    pretrained_cfg: Dict[str, Any]
    num_classes: int
    in_chans: int = 3
    num_features: int
    grad_checkpointing: bool = False
    _classifier: str = "head"  # attribute holding the classifier
    _global_pools: Tuple[str, ...] = ("avg",)  # what reset_classifier(global_pool=...) accepts

    # substrings of parameter names that never get weight decay (besides all 1-D tensors)
    _no_weight_decay_keys: Tuple[str, ...] = ("pos_embed", "cls_token", "reg_token", "dist_token",
                                             "relative_position_bias_table")

    # -- data config ------------------------------------------------------------------------
    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @property
    def name(self) -> str:
        return self.pretrained_cfg.get("architecture", type(self).__name__)

    # -- family hooks -------------------------------------------------------------------------
    def _feature_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[TokenLayout]]:  # pragma: no cover
        raise NotImplementedError

    def _feature_units(self) -> Sequence[nn.Module]:  # pragma: no cover
        raise NotImplementedError

    def _feature_unit(self, i: int, unit: nn.Module, x: torch.Tensor, layout: Optional[TokenLayout]
                      ) -> Tuple[torch.Tensor, Optional[TokenLayout]]:  # pragma: no cover
        raise NotImplementedError

    def _feature_info(self) -> List[Dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def _truncate_units(self, n: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm after the last unit (sized for the last unit's width); identity if none."""
        norm = getattr(self, "norm", None)
        return norm(x) if norm is not None else x

    def _feature_end(self, x: torch.Tensor, layout: Optional[TokenLayout], complete: bool) -> torch.Tensor:
        """Final features from the last unit run (``complete``: all units ran)."""
        return self._final_norm(x) if complete or self.is_isotropic else x

    def forward_halves(self, x: torch.Tensor) -> List[Intermediate]:  # pragma: no cover - per family
        """The analyses' view: the embedding, then every block's attention half and MLP half (and
        downsamplers / norms), each an :class:`Intermediate` with a ``(B, C, H, W)`` map."""
        raise NotImplementedError

    # -- running blocks ---------------------------------------------------------------------------
    def _block(self, blk: nn.Module, x: torch.Tensor, layout: Optional[TokenLayout] = None) -> torch.Tensor:
        """``blk(x, layout)`` (``blk(x)`` when ``layout`` is None), checkpointed when gradient
        checkpointing is on and autograd records (non-reentrant :func:`torch.utils.checkpoint`)."""
        args = (x,) if layout is None else (x, layout)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = bool(enable)

    # -- the contract -----------------------------------------------------------------------------
    @property
    def feature_info(self) -> List[Dict[str, Any]]:
        """timm's list of feature taps: ``num_chs``, ``reduction`` (input stride), ``module``."""
        return self._feature_info()

    @property
    def is_isotropic(self) -> bool:
        return len({d["reduction"] for d in self._feature_info()}) == 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_units(*self._feature_stem(x))

    def _run_units(self, x: torch.Tensor, layout: Optional[TokenLayout]) -> torch.Tensor:
        for i, unit in enumerate(self._feature_units()):
            x, layout = self._feature_unit(i, unit, x, layout)
        return self._feature_end(x, layout, complete=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @staticmethod
    def _format(x: torch.Tensor, layout: Optional[TokenLayout], output_fmt: str) -> torch.Tensor:
        if layout is None:  # a (B, C, H, W) map
            return x if output_fmt == "NCHW" else x.flatten(2).transpose(1, 2)
        return layout.to_map(x).contiguous() if output_fmt == "NCHW" else x[:, layout.num_prefix:]

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              stop_early: bool = False):
        """timm's ``forward_intermediates``: the outputs of the feature taps ``indices`` (an int ``n``:
        the last ``n``; a list: those taps; None: all), as ``(B, C, H, W)`` maps (``"NCHW"``) or
        ``(B, H*W, C)`` patch tokens (``"NLC"``), prefix tokens dropped.  ``norm`` applies the final
        norm (to every block of an isotropic model, to the last stage of a hierarchical one);
        ``stop_early`` stops after the last tap.  Returns ``(final features, intermediates)``, or the
        list alone with ``intermediates_only``.  For both halves of every block see
        :meth:`forward_halves`."""
        if output_fmt not in OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FMTS}, got {output_fmt!r}")
        units = list(self._feature_units())
        take, max_index = feature_take_indices(len(units), indices)
        isotropic = self.is_isotropic
        x, layout = self._feature_stem(x)
        run = units[:max_index + 1] if stop_early else units
        out = []
        for i, unit in enumerate(run):
            x, layout = self._feature_unit(i, unit, x, layout)
            if i in take:
                y = self._final_norm(x) if norm and (isotropic or i == len(units) - 1) else x
                out.append(self._format(y, layout, output_fmt))
        if intermediates_only:
            return out
        return self._feature_end(x, layout, complete=len(run) == len(units)), out

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's pruning: drop the units after the last of ``indices``; ``prune_norm`` drops the final
        norm, ``prune_head`` the classifier (both go when a hierarchical model loses its last stage,
        as they are sized for it).  Returns the kept indices."""
        info = self._feature_info()
        take, max_index = feature_take_indices(len(info), indices)
        prune_end = max_index < len(info) - 1 and not self.is_isotropic
        self._truncate_units(max_index + 1)
        if (prune_norm or prune_end) and isinstance(getattr(self, "norm", None), nn.Module):
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = info[max_index]["num_chs"]
        if prune_head or prune_end:
            if isinstance(getattr(self, "fc_norm", None), nn.Module):
                self.fc_norm = nn.Identity()
            self.reset_classifier(0)
        return take

    def get_classifier(self) -> nn.Module:
        return getattr(self, self._classifier)

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool not in self._global_pools:
            raise ValueError(f"{type(self).__name__} pools with {self._global_pools}; got global_pool={global_pool!r}")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none, ``forward`` returns the pooled features)."""
        if global_pool is not None:
            self._set_global_pool(global_pool)
        ref = next(self.parameters())
        self.num_classes = num_classes
        head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                else nn.Identity())
        setattr(self, self._classifier, head.train(self.training))
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters excluded from weight decay: every 1-D tensor (biases, norm
        scales, shortcut/FeatScale/AttnScale gains) and position tables / special tokens."""
        return {
            n for n, p in self.named_parameters()
            if p.ndim <= 1 or any(k in n for k in self._no_weight_decay_keys)
        }

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a state dict, fitting the tensors that depend on the input size (position tables,
        relative tables, FLatten's key position codes) to this model first
        (:func:`vitlab.models.resize.resize_size_dependent`, the one place that does it)."""
        from vitlab.models.resize import resize_size_dependent

        return super().load_state_dict(resize_size_dependent(self, state_dict), strict=strict, assign=assign)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"create the model with in_chans={x.shape[1]} to change it"
            )


def make_default_cfg(architecture: str, img_size: int, num_classes: int, in_chans: int = 3,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra: Any) -> Dict[str, Any]:
    """A timm-style ``default_cfg``: what a data pipeline needs to feed the model."""
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    cfg = dict(architecture=architecture, input_size=(in_chans, img_size, img_size), num_classes=num_classes,
               mean=tuple(mean), std=tuple(std), interpolation="bicubic", crop_pct=0.875)
    cfg.update(extra)
    return cfg


def crop_pct_by_size(kw: Dict[str, Any]) -> float:
    """timm's ``crop_pct`` for the hierarchical families: 1.0 at 384 px and above, else 0.9."""
    return 1.0 if kw.get("img_size", 224) >= 384 else 0.9


def register_recipe(model_cls, name: str, defaults: Dict[str, Any], doc: str,
                    adjust: Optional[Callable[[Dict[str, Any], Dict[str, Any]], Dict[str, Any]]] = None,
                    **cfg: Any) -> None:
    """Register ``name`` as a paper recipe: ``model_cls(**defaults)`` with the caller's overrides
    winning, and a ``default_cfg`` (extra entries ``cfg``, e.g. ``crop_pct``) built from the
    resolved image size, class count and channels.  ``adjust(kw, overrides)`` may rewrite the resolved
    arguments (e.g. a 384-px variant's windows unless the caller set them); a callable ``cfg`` value is
    called with them (e.g. :func:`crop_pct_by_size`)."""
    from vitlab.models.factory import register_model

    def factory(**overrides: Any):
        kw = {**defaults, **overrides}
        if adjust is not None:
            kw = adjust(kw, overrides)
        extra = {k: v(kw) if callable(v) else v for k, v in cfg.items()}
        default_cfg = make_default_cfg(name, kw.get("img_size", 224), kw.get("num_classes", 1000),
                                       kw.get("in_chans", 3), **extra)
        return model_cls(architecture=name, default_cfg=default_cfg, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.model_cls = model_cls
    register_model(factory)
