"""Lipschitz constants of a network: an upper bound composed from its parts, and an
empirical lower estimate from the input Jacobian.

Per-part bounds follow "LipsFormer: Introducing Lipschitz Continuity to Vision Transformers"
(Qi et al., ICLR 2023), §9 of ``shared/specs/lipsformer.md`` (ℓ2 norm on the flattened token
matrix).  Convolutions use the exact singular values of the circular convolution (Sedghi,
Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019), an upper bound for
zero padding on a grid large enough not to wrap.  Dot-product attention and LayerNorm have no
finite global constant (Kim, Papamakarios & Mnih, "The Lipschitz Constant of Self-Attention",
ICML 2021), so a model containing them is reported as unbounded (``math.inf``).

The bound dispatches on the public part classes of ``vitlab.layers`` (for attention: on its
core, grouping, modifiers and position parts), on the one ``Block`` and on the public stages of
ViT, Swin and CSwin; any part it does not know is reported as unbounded with its name, never
silently skipped.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["lipschitz_upper_bound", "lipschitz_bound_report", "lipschitz_estimate", "conv2d_norm_bound",
           "GELU_LIPSCHITZ"]

GELU_LIPSCHITZ = 1.129  # max |GELU'(x)| = 1.128904... (at x ≈ 1.414), rounded up
_ACT = {nn.ReLU: 1.0, nn.GELU: GELU_LIPSCHITZ, nn.Tanh: 1.0, nn.Sigmoid: 0.25, nn.LeakyReLU: None,
        nn.Identity: 1.0, nn.Dropout: 1.0, nn.SiLU: 1.1, nn.Hardtanh: 1.0, nn.ReLU6: 1.0}


def conv2d_norm_bound(conv: nn.Conv2d, input_hw: Optional[Tuple[int, int]] = None) -> float:
    """Upper bound on the ℓ2 operator norm of ``conv`` (bias ignored: it does not change a
    Lipschitz constant).  Non-overlapping patchify convs (stride = kernel, no padding): exact,
    σ₁ of the reshaped weight per group.  Otherwise: max over frequencies and groups of σ₁ of
    the kernel's 2-D DFT on a grid of ``input + kernel − 1`` (the circular convolution that
    contains the zero-padded one; Sedghi et al., ICLR 2019); stride only lowers the norm."""
    w = conv.weight.detach().double()
    out_c, in_g, kh, kw = w.shape
    g = conv.groups
    if tuple(conv.stride) == (kh, kw) and tuple(conv.padding) in ((0, 0), 0) and tuple(conv.dilation) == (1, 1):
        mats = w.reshape(g, out_c // g, in_g * kh * kw)
        return float(torch.linalg.matrix_norm(mats, ord=2).max())
    dh, dw = conv.dilation
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    h, wd = input_hw if input_hw is not None else (ekh, ekw)
    nh, nw = h + ekh - 1 + 2 * conv.padding[0], wd + ekw - 1 + 2 * conv.padding[1]
    full = torch.zeros(out_c, in_g, nh, nw, dtype=torch.float64)
    full[:, :, 0:ekh:dh, 0:ekw:dw] = w
    f = torch.fft.fft2(full)  # (out, in/g, nh, nw)
    f = f.reshape(g, out_c // g, in_g, nh, nw).permute(0, 3, 4, 1, 2)  # (g, nh, nw, out/g, in/g)
    if f.shape[-1] == 1 or f.shape[-2] == 1:
        return float(f.abs().pow(2).sum(dim=(-2, -1)).sqrt().max())
    return float(torch.linalg.matrix_norm(f, ord=2).max())


class _Bounder:
    def __init__(self, model: nn.Module, input_size=None):
        self.model = model
        self.factors: List[Dict] = []
        self.shapes: Dict[nn.Module, tuple] = {}
        self._record_shapes(input_size)

    def _record_shapes(self, input_size):
        if input_size is None:
            cfg = getattr(self.model, "default_cfg", None) or {}
            input_size = cfg.get("input_size")
        if input_size is None:
            return
        hooks = []
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d) or hasattr(m, "qkv"):
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out: self.shapes.__setitem__(mod, tuple(inp[0].shape))))
        was = self.model.training
        self.model.eval()
        try:
            p = next(self.model.parameters(), None)
            x = torch.zeros(1, *input_size, dtype=p.dtype if p is not None else torch.float32,
                            device=p.device if p is not None else "cpu")
            with torch.no_grad():
                self.model(x)
        finally:
            self.model.train(was)
            for h in hooks:
                h.remove()

    # -- parts ------------------------------------------------------------------------------
    def part(self, m: Optional[nn.Module], name: str) -> float:
        from vitlab import layers as L
        if m is None or isinstance(m, (nn.Identity, nn.Dropout)) or type(m).__name__ == "DropPath":
            return 1.0
        if isinstance(m, nn.Linear):
            return float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
        if isinstance(m, nn.Conv2d):
            shp = self.shapes.get(m)
            return conv2d_norm_bound(m, shp[-2:] if shp else None)
        if type(m) in _ACT and _ACT[type(m)] is not None:
            return _ACT[type(m)]
        if isinstance(m, nn.LeakyReLU):
            return max(1.0, abs(m.negative_slope))
        if isinstance(m, L.CenterNorm):
            return float(m.lipschitz_constant())
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.training and m.track_running_stats:
            g = m.weight.detach().abs() if m.weight is not None else torch.ones_like(m.running_var)
            return float((g / (m.running_var + m.eps).sqrt()).max())
        if isinstance(m, L.ChannelScale):
            return float(m.gamma.detach().abs().max())
        if isinstance(m, L.FeatScale):
            # (1+s)⊙DC + (1+t)⊙HC with DC, HC orthogonal projections along the token axis
            return float(torch.maximum((1 + m.s.detach()).abs(), (1 + m.t.detach()).abs()).max())
        if isinstance(m, L.Mlp):
            return self.part(m.fc2, name) * self.part(m.act, name) * self.part(m.fc1, name)
        if isinstance(m, L.DWConvUnit):
            inner = self.part(m.act, name) * self.part(m.dw, name)
            if m.pw is not None:
                inner *= self.part(m.act, name) * self.part(m.pw, name)
            return 1.0 + self.part(m.alpha, name) * inner
        if isinstance(m, L.PatchEmbed):
            return self.part(m.proj, name) * self.part(m.norm, name)
        if isinstance(m, L.MultiHeadAttention):
            return self._attention(m, name)
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
            return self._unbounded(name, f"{type(m).__name__} divides by the standard deviation (no global constant)")
        if isinstance(m, nn.Sequential):
            out = 1.0
            for i, c in enumerate(m):
                out *= self.part(c, f"{name}.{i}")
            return out
        return self._unbounded(name, f"no Lipschitz rule for part {type(m).__name__}")

    def _unbounded(self, name, why):
        self.factors.append({"name": name, "bound": math.inf, "note": why})
        return math.inf

    def _attention(self, m, name) -> float:
        core = m.core.name
        if core == "focused_linear":
            return self._unbounded(name, "focused linear attention (ReLU-feature kernel) is not globally Lipschitz")
        if core == "cosine":
            return self._cosine(m, name)
        if core == "softmax":
            return self._unbounded(name, "dot-product attention has no finite global Lipschitz constant")
        return self._unbounded(name, f"no Lipschitz rule for attention core {core!r}")

    def _tokens_per_head(self, m) -> Optional[List[int]]:
        """Keys each head attends over (the group size), from the grouping and the recorded input."""
        g = m.grouping.name
        if g == "window":
            return [math.prod(m.grouping.window)] * m.num_heads
        if g == "stripes":
            hb = m.num_heads // len(m.grouping.stripes)
            return [math.prod(s) for s in m.grouping.stripes for _ in range(hb)]
        shp = self.shapes.get(m)
        return [shp[1]] * m.num_heads if g == "global" and shp is not None else None

    def _cosine(self, m, name) -> float:
        """SCSA with V normalised and ε in the norms (spec §9, derived), per head over the ``N_h`` keys
        of its group (windows and stripes are block-diagonal; additive biases and masks leave the
        softmax Jacobian bound unchanged):
        L_h = (1/√ε)[2√2·τ(‖W_Q^h‖ + √N_h‖W_K^h‖) + √N_h‖W_V^h‖]; all heads √(Σ L_h²); a LePE term adds
        max_b ‖conv_b‖·‖W_V‖/√ε; the output projection multiplies by ‖W_O‖."""
        if not (m.core.normalize_v and m.core.eps > 0):
            return self._unbounded(name, "cosine attention without normalize_v and eps > 0 is only Lipschitz "
                                         "on bounded inputs (see lipsformer.md §9)")
        other = [p.name for p in (m.projection, *m.modifiers, *m.positions)
                 if p.name not in ("linear", "attnscale", "relative", "lepe")]
        if other or m.grouping.name not in ("global", "window", "stripes"):
            return self._unbounded(name, f"no Lipschitz rule for attention part(s) {other or [m.grouping.name]}")
        ns = self._tokens_per_head(m)
        if ns is None:
            return self._unbounded(name, "number of tokens unknown (model has no default_cfg input_size)")
        wq, wk, wv = m.qkv.weight.detach().double().split(m.inner, dim=0)
        tau, eps, d = float(m.tau), m.core.eps, m.head_dim
        omega = (m.attn_scale.omega.detach().double() if getattr(m, "attn_scale", None) is not None
                 else torch.zeros(m.num_heads, dtype=torch.float64))
        total = 0.0
        for h, n in enumerate(ns):
            sl = slice(h * d, (h + 1) * d)
            nq, nk, nv = (float(torch.linalg.matrix_norm(w[sl], ord=2)) for w in (wq, wk, wv))
            lh = (2 * math.sqrt(2) * tau * (nq + math.sqrt(n) * nk) + math.sqrt(n) * nv) / math.sqrt(eps)
            om = float(omega[h])
            # AttnScale: Â V = (1+ω) A V − ω·mean_j v_j; the mean is a projection (norm 1)
            lh = abs(1 + om) * lh + abs(om) * nv / math.sqrt(eps)
            total += lh ** 2
        total = math.sqrt(total)
        for p in m.positions:
            if p.name == "lepe":
                conv = max(self.part(c, name + ".lepe") for c in m.lepe)
                total += conv * float(torch.linalg.matrix_norm(wv, ord=2)) / math.sqrt(eps)
                if p.div_heads:  # (attention + LePE) / sqrt(heads per branch)
                    total /= math.sqrt(m.num_heads // len(getattr(m.grouping, "stripes", [None])))
        return total * self.part(m.proj, name)

    def _branches(self, branches, name) -> float:
        """``x + sum_j f_j(x)`` over parallel branches ``drop_path(ls(f(norm(x))))``: ``1 + sum_j Lip f_j``."""
        return 1 + sum(self.part(b.norm, f"{name}.{j}.norm") * self.part(getattr(b, b.role), f"{name}.{j}.{b.role}")
                       * self.part(b.ls, f"{name}.{j}.ls") for j, b in enumerate(branches))

    def block(self, blk, name) -> float:
        from vitlab.models.block import Block

        if not isinstance(blk, Block):  # a family's own composite block (MaxViT, MobileViT, LookupViT)
            return self._unbounded(name, f"no Lipschitz rule for block {type(blk).__name__}")
        if getattr(blk, "num_parallel", 1) > 1:
            half1, half2 = self._branches(blk.attns, name + ".attns"), self._branches(blk.ffns, name + ".ffns")
            self.factors.append({"name": name + " (parallel attention branches)", "bound": half1})
            self.factors.append({"name": name + " (parallel MLP branches)", "bound": half2})
            return half1 * half2
        if blk.wiring == "parallel_scaling":  # x + ls1(f(n(x)) + g(n(x))): Lip <= 1 + Lip ls1 Lip n (Lip f + Lip g)
            inner = self.part(blk.attn, name + ".attn") * self.part(blk.featscale, name + ".featscale")
            inner += self.part(blk.mlp, name + ".mlp")
            whole = 1 + self.part(blk.norm1, name + ".norm1") * self.part(blk.ls1, name + ".ls1") * inner
            self.factors.append({"name": name + " (parallel scaling block)", "bound": whole})
            return whole
        lip_attn = self.part(blk.norm1 if not blk.post_norm else None, name + ".norm1")
        lip_attn *= self.part(blk.attn, name + ".attn")
        lip_attn *= self.part(blk.featscale, name + ".featscale") * self.part(blk.ls1, name + ".ls1")
        lip_mlp = 0.0  # an attention-only block (ViViT's spatial half) has no MLP branch
        if blk.mlp is not None:
            lip_mlp = self.part(blk.norm2 if not blk.post_norm else None, name + ".norm2")
            lip_mlp *= self.part(blk.mlp, name + ".mlp") * self.part(blk.ls2, name + ".ls2")
        units = 1.0
        if blk.conv_units is not None:
            for i, u in enumerate(blk.conv_units):
                units *= self.part(u, f"{name}.conv_units.{i}")
        if blk.wiring == "parallel":  # x + f(x) + g(x): Lip <= 1 + Lip f + Lip g
            whole = units * (1 + lip_attn + lip_mlp)
            self.factors.append({"name": name + " (parallel block)", "bound": whole})
            return whole
        half1 = units * (1 + lip_attn)
        half2 = 1 + lip_mlp
        if blk.post_norm:
            half1 *= self.part(blk.norm1, name + ".norm1")
            half2 *= self.part(getattr(blk, "norm2", None), name + ".norm2")
        self.factors.append({"name": name + " (attention half)", "bound": half1})
        self.factors.append({"name": name + " (MLP half)", "bound": half2})
        return half1 * half2

    def _add(self, logs, name, value) -> None:
        self.factors.append({"name": name, "bound": value})
        logs.append(value)

    def _embed(self, e, name) -> float:
        """A stem or downsampler: a conv (or a Linear after a 2x2 regrouping, a permutation), then its norm."""
        proj = getattr(e, "proj", None) or getattr(e, "reduction", None)
        if proj is None:
            return self._unbounded(name, f"no Lipschitz rule for part {type(e).__name__}")
        return self.part(proj, name) * self.part(getattr(e, "norm", None), name + ".norm")

    def _backbone(self, m) -> List[float]:
        """Any :class:`~vitlab.models.backbone.Backbone`: stem, then per stage its downsampler, blocks and
        norm (prefix tokens and position tables are additive constants: Lipschitz 1), the final norm,
        the pooling (a mean over ``n`` tokens: 1/sqrt(n); reading the class token: 1), ``fc_norm`` and
        the head."""
        logs: List[float] = []
        stem = getattr(m, "patch_embed", None)
        self._add(logs, "patch_embed", self._embed(stem, "patch_embed") if stem is not None else
                  self._unbounded("patch_embed", f"no Lipschitz rule for the stem of {type(m).__name__}"))
        for name, prefix, stage in m.named_stages():
            if stage.downsample is not None and not isinstance(stage.downsample, nn.Identity):
                self._add(logs, f"{name}.downsample", self._embed(stage.downsample, f"{name}.downsample"))
            peg = getattr(stage, "pos_block", None)
            for j, blk in enumerate(stage.blocks):
                logs.append(self.block(blk, f"{prefix}.{j}"))
                if peg is not None and j == stage.pos_block_after:  # x + conv(x) (PEG): 1 + Lip(conv)
                    conv = self.part(peg.proj[0], f"{name}.pos_block")
                    self._add(logs, f"{name}.pos_block", 1 + conv if peg.stride == 1 else conv)
            if stage.norm is not None and not isinstance(stage.norm, nn.Identity):
                self._add(logs, f"{name}.norm", self.part(stage.norm, f"{name}.norm"))
        self._add(logs, "norm", self.part(getattr(m, "norm", None), "norm"))
        n = (getattr(stem, "num_patches", None) if m.stage_attr == "blocks"
             else math.prod(m.stage_list()[-1].grid_size))
        token = m.global_pool == "token" and m.features_fmt == "NLC"
        self._add(logs, "pool", 1.0 if token or not n else 1 / math.sqrt(n))  # 1 still bounds a mean of unknown size
        self._add(logs, "fc_norm", self.part(getattr(m, "fc_norm", None), "fc_norm"))
        self._add(logs, "head", self.part(m.head, "head"))
        return logs

    def model_bound(self) -> float:
        from vitlab.models.backbone import Backbone
        from vitlab.models.block import Block

        m = self.model
        if isinstance(m, Backbone):
            return _log_product(self._backbone(m))
        if isinstance(m, Block):
            return self.block(m, "block")
        val = self.part(m, type(m).__name__)
        if not self.factors or self.factors[-1]["name"] != type(m).__name__:
            self.factors.append({"name": type(m).__name__, "bound": val})
        return val


def _log_product(values) -> float:
    if any(v == 0 for v in values):
        return 0.0
    if any(math.isinf(v) for v in values):
        return math.inf
    s = sum(math.log(v) for v in values)
    return math.exp(s) if s < 700 else math.inf


def lipschitz_bound_report(model: nn.Module, input_size: Optional[Tuple[int, int, int]] = None) -> Dict:
    """Upper bound on the ℓ2 Lipschitz constant of ``model`` (input → logits, eval mode) with
    its per-part factors: ``{"bound", "log10_bound", "factors": [{name, bound, note?}], "unbounded":
    [names]}``.  ``input_size`` (C, H, W) defaults to ``model.default_cfg["input_size"]`` (the
    token count enters the cosine-attention bound and the conv grid)."""
    b = _Bounder(model, input_size)
    total = b.model_bound()
    logs = [math.log10(f["bound"]) for f in b.factors if 0 < f["bound"] < math.inf]
    return {
        "bound": total,
        "log10_bound": math.inf if math.isinf(total) else (math.log10(total) if total > 0 else -math.inf),
        "sum_log10_factors": sum(logs),
        "factors": b.factors,
        "unbounded": list(dict.fromkeys(f["name"] for f in b.factors if math.isinf(f["bound"]))),
    }


def lipschitz_upper_bound(model: nn.Module) -> float:
    """A certified upper bound on the Lipschitz constant (ℓ2, input image → logits, eval mode),
    composed from per-part bounds (LipsFormer, Qi et al. 2023, §9); ``math.inf`` when a part has
    no finite global constant (dot-product attention, LayerNorm)."""
    return float(lipschitz_bound_report(model)["bound"])


def lipschitz_estimate(model: nn.Module, inputs: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """Empirical lower estimate of the Lipschitz constant: max over the samples in ``inputs``
    of the spectral norm of the input Jacobian of ``model`` (logits), by power iteration on
    JᵀJ with Jacobian-vector products (double backward), in eval mode.  Every value is a true
    lower bound of the global constant (up to power-iteration convergence from below).
    Cost: ``2 · iters`` backward passes over ``inputs``.
    """
    if not torch.is_tensor(inputs) or inputs.dim() < 2:
        raise ValueError(f"inputs must be a batch tensor (B, ...), got {getattr(inputs, 'shape', inputs)}")
    from vitlab.analysis.hessian import _double_backward_ok
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = inputs.detach().clone().requires_grad_(True)
    b = x.shape[0]
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    sigma = torch.zeros(b, dtype=torch.float64)
    try:
        with _double_backward_ok():
            out = model(x)
            for _ in range(iters):
                v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(b, *[1] * (v.dim() - 1))
                u = torch.zeros_like(out, requires_grad=True)
                jtu = torch.autograd.grad(out, x, grad_outputs=u, create_graph=True)[0]
                jv = torch.autograd.grad(jtu, u, grad_outputs=v, retain_graph=True)[0]  # J v
                jtjv = torch.autograd.grad(out, x, grad_outputs=jv, retain_graph=True)[0]  # Jᵀ J v
                sigma = jv.flatten(1).norm(dim=1).double().detach().cpu()
                v = jtjv.detach()
    finally:
        model.train(was)
    return float(sigma.max())
