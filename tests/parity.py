"""One timm parity helper for every test that compares a vitlab model with its timm reference.

timm's default init leaves every Linear bias at zero, every norm at (1, 0), LayerScale at
1e-5 and BatchNorm statistics at (0, 1): a vitlab model that ignored any of them would still
match.  :func:`randomize_` therefore draws **every** floating-point parameter and buffer of
the reference model from a fixed seed at a scale that keeps the logits finite and
informative, and refuses a float tensor it has no rule for; :func:`check_parity` loads the
randomised weights into vitlab with ``load_timm_weights``, compares logits and (where both
models offer them) ``forward_intermediates`` in eval mode, then goes the other way with
``to_timm_state_dict`` into a fresh timm model.

    from parity import check_parity
    check_parity("vit_tiny_patch16_224", img_size=32, depth=2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["randomize_", "compare", "check_parity", "ParityReport", "timm_pair", "swin_official_layout"]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
_TOKENS = ("cls_token", "dist_token", "reg_token", "pos_embed", "mask_token")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def _draw(name: str, t: torch.Tensor, module: nn.Module, g: torch.Generator) -> Optional[torch.Tensor]:
    """A random value for the float tensor ``name`` of ``module`` (None: leave it)."""
    leaf = name.rsplit(".", 1)[-1]
    rnd = lambda std, mean=0.0: torch.randn(t.shape, generator=g, dtype=torch.float64) * std + mean  # noqa: E731
    uni = lambda lo, hi: torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo  # noqa: E731
    if leaf == "running_var":
        return uni(0.5, 2.0)  # positive
    if leaf == "running_mean":
        return rnd(0.2)
    if _is_norm(module) and leaf == "weight":
        return uni(0.7, 1.3)
    if "gamma" in leaf:  # LayerScale (timm: ls1.gamma; CaiT: gamma_1)
        return uni(0.2, 1.0)
    if "relative_position_bias_table" in leaf:
        return rnd(0.5)
    if leaf in _TOKENS:
        return rnd(0.2)
    if leaf == "bias" or t.dim() == 1:
        return rnd(0.3 if _is_norm(module) else 0.2)
    if t.dim() >= 2:
        fan_in = t[0].numel()
        return rnd(min(0.2, max(0.02, 1.0 / math.sqrt(fan_in))))
    return None


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every float parameter and persistent float buffer of ``model`` in place with
    seeded random values (see module docstring); returns ``model``.  Raises on a float tensor
    of the state dict that no rule covers, so a new kind of parameter cannot stay at its init."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in state.items():
            if not t.is_floating_point():
                continue  # integer buffers: num_batches_tracked, index tables
            owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
            value = _draw(name, t, owner, g)
            if value is None:
                raise AssertionError(f"parity.randomize_: no rule for {name} {tuple(t.shape)}")
            t.copy_(value.to(t.dtype))
    return model


@dataclass
class ParityReport:
    """Max absolute differences (vitlab vs timm) and the scale of the reference logits."""
    logits: float
    logits_scale: float
    intermediates: List[float] = field(default_factory=list)
    back: float = 0.0
    state_dict_back: float = 0.0
    notes: List[str] = field(default_factory=list)

    def worst(self) -> float:
        return max([self.logits, self.back, self.state_dict_back] + self.intermediates)


def _timm_intermediates(ref: nn.Module, x: torch.Tensor) -> Optional[List[torch.Tensor]]:
    if not hasattr(ref, "forward_intermediates"):
        return None
    return list(ref.forward_intermediates(x, intermediates_only=True))


def _match_in_order(want: List[torch.Tensor], have: List[torch.Tensor]) -> List[float]:
    """For each of timm's intermediates (in order), the difference to the first of vitlab's
    later maps of the same shape that matches it (to 1e-3 relative), else to the closest one
    of that shape; inf where vitlab has no map of that shape left."""
    diffs, j = [], 0
    for w in want:
        cands = [(k, float((have[k] - w).abs().max())) for k in range(j, len(have)) if have[k].shape == w.shape]
        if not cands:
            diffs.append(math.inf)
            continue
        scale = float(w.abs().max()) + 1e-6
        hit = next(((k, d) for k, d in cands if d <= 1e-3 * scale), None)
        k, d = hit if hit is not None else min(cands, key=lambda c: c[1])
        diffs.append(d)
        j = k + 1 if hit is not None else j
    return diffs


@torch.no_grad()
def compare(ref: nn.Module, ours: nn.Module, x: torch.Tensor, intermediates: bool = True) -> ParityReport:
    """Logits, ``forward_features`` and, where both models offer ``forward_intermediates``, timm's
    intermediates matched in order against vitlab's block maps, in eval mode on ``x``."""
    ref.eval(), ours.eval()
    want, got = ref(x), ours(x)
    if isinstance(want, (tuple, list)) or isinstance(got, (tuple, list)):
        raise AssertionError(f"eval-mode forward must return one tensor, got {type(want)} / {type(got)}")
    if want.shape != got.shape:
        raise AssertionError(f"logit shapes differ: timm {tuple(want.shape)}, vitlab {tuple(got.shape)}")
    rep = ParityReport(float((got - want).abs().max()), float(want.abs().max()))
    if not intermediates:
        return rep
    fw, fg = ref.forward_features(x), ours.forward_features(x)
    if fw.shape == fg.shape:
        rep.intermediates.append(float((fw - fg).abs().max()))
    else:
        rep.notes.append(f"forward_features shapes differ: timm {tuple(fw.shape)}, vitlab {tuple(fg.shape)}")
    inter = _timm_intermediates(ref, x)
    if inter is None or not hasattr(ours, "forward_halves"):
        rep.notes.append("intermediates not compared (a model lacks forward_intermediates)")
        return rep
    have = [e.feature for e in ours.forward_halves(x)]
    rep.intermediates += _match_in_order(inter, have)
    return rep


def timm_pair(timm_name: str, vitlab_name: Optional[str] = None, seed: int = 0, **kwargs
              ) -> Tuple[nn.Module, nn.Module]:
    """(randomised timm model, vitlab model loaded from it by ``load_timm_weights``), eval mode."""
    import timm

    import vitlab
    from vitlab.interop import load_timm_weights

    ref = randomize_(timm.create_model(timm_name, pretrained=False, **kwargs), seed).eval()
    ours = vitlab.create_model(vitlab_name or timm_name, **kwargs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    load_timm_weights(ours, ref.state_dict())
    return ref, ours.eval()


def _input(model: nn.Module, batch: int, seed: int) -> torch.Tensor:
    c, h, w = model.default_cfg["input_size"]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed + 1))


def check_parity(timm_name: str, vitlab_name: Optional[str] = None, seed: int = 0, atol: float = 1e-4,
                 rtol: float = 1e-5, batch: int = 2, intermediates: bool = True,
                 x: Optional[torch.Tensor] = None, **kwargs) -> ParityReport:
    """Randomise ``timm.create_model(timm_name, **kwargs)``, load it into
    ``vitlab.create_model(vitlab_name or timm_name, **kwargs)`` and assert equal logits and
    intermediates (to ``atol + rtol * max|logits|``); then write the vitlab weights back with
    ``to_timm_state_dict`` into a fresh timm model (strict) and assert it holds the same tensors
    and gives the same logits.  Returns the :class:`ParityReport`."""
    import timm

    from vitlab.interop import to_timm_state_dict

    ref, ours = timm_pair(timm_name, vitlab_name, seed, **kwargs)
    x = _input(ours, batch, seed) if x is None else x
    rep = compare(ref, ours, x, intermediates)
    tol = atol + rtol * rep.logits_scale
    with torch.no_grad():
        want = ref(x)
    # informative logits: finite, not tiny, and different between classes and between images
    assert torch.isfinite(want).all(), f"{timm_name}: randomised reference logits are not finite"
    assert 0.1 < rep.logits_scale < 1e4, f"{timm_name}: reference logits of scale {rep.logits_scale:.3g}"
    assert float(want.std(dim=-1).min()) > 1e-2, f"{timm_name}: logits nearly equal across classes"
    if len(want) > 1:
        assert float((want[0] - want[1]).abs().max()) > 1e-2, f"{timm_name}: logits do not depend on the image"
    assert rep.logits <= tol, f"{timm_name}: logits differ by {rep.logits:.3g} (scale {rep.logits_scale:.3g})"
    for i, d in enumerate(rep.intermediates):
        assert d <= tol, f"{timm_name}: intermediate {i} differs by {d:.3g}"
    back = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    back.load_state_dict(to_timm_state_dict(ours), strict=True)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    rep.state_dict_back = max(float((ref_sd[k].double() - back_sd[k].double()).abs().max()) for k in ref_sd)
    assert rep.state_dict_back == 0.0, f"{timm_name}: to_timm_state_dict changes weights by {rep.state_dict_back:.3g}"
    with torch.no_grad():
        rep.back = float((back(x) - ours(x)).abs().max())
    assert rep.back <= tol, f"{timm_name}: timm with vitlab's weights differs by {rep.back:.3g}"
    return rep


def describe(rep: ParityReport) -> Dict[str, float]:
    return {"logits": rep.logits, "scale": rep.logits_scale, "back": rep.back,
            "intermediates": max(rep.intermediates, default=0.0)}


def on_meta(create, name: str, **kwargs) -> nn.Module:
    """``create(name, **kwargs)`` (timm's or vitlab's ``create_model``) built on the ``meta`` device: parameter
    counts and shapes of any size at no memory or init cost."""
    with torch.device("meta"):
        return create(name, **kwargs)


def meta_count(create, name: str, **kwargs) -> int:
    """The parameter count of :func:`on_meta`'s model."""
    return sum(p.numel() for p in on_meta(create, name, **kwargs).parameters())


def swin_official_layout(timm_state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A timm Swin (V1 or V2) state dict in the official repositories' layout, written independently of vitlab's
    converter: patch merging saved at the end of stage ``i`` (timm: the start of stage ``i + 1``), the classifier
    as ``head`` (timm: ``head.fc``)."""
    official = {}
    for k, v in timm_state_dict.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.", f"layers.{i - 1}.", 1)
        official[k.replace("head.fc.", "head.")] = v
    return official
