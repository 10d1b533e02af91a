"""Every registered model honours the model contract, at its default size and at a small one.

* default size: the forward runs on the ``meta`` device (shapes only, no memory, no arithmetic), so
  every name of the registry is checked at the size a user gets, including the 600M-parameter ones;
* small size (the family's small overrides below): a real training step, finite logits and gradients,
  every parameter reached by the gradient, ``forward_intermediates`` and ``record_attention``.

A model whose class has no small size here fails with a message saying so: a new family must add one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
from torch import nn

import vitlab
from vitlab.layers import record_attention

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = vitlab.list_models()


def _patch(m: nn.Module) -> int:
    return int(m.patch_embed.patch_size[0]) if hasattr(m.patch_embed, "patch_size") else 8


def _iso(m: nn.Module) -> Dict[str, Any]:
    return dict(img_size=4 * _patch(m), depth=2, embed_dim=32, num_heads=2)


_STAGES4 = dict(depths=(1, 2, 1, 1), num_heads=(2, 2, 2, 2))
# class name -> small overrides, from the default-size model
SMALL: Dict[str, Callable[[nn.Module], Dict[str, Any]]] = {
    "VisionTransformer": _iso,
    "Eva": _iso,  # timm Eva's keys (vit_*_rope_reg*)
    "Beit": _iso,  # BEiT / BEiT v2 (timm Beit's keys)
    "ViT5": _iso,  # ViT-5: registers with their own RoPE, RMS QK-norm
    "DistilledVisionTransformer": _iso,
    "Cait": lambda m: dict(_iso(m), depth_token_only=1),
    "T2TViT": lambda m: dict(_iso(m), token_dim=16),
    "CCT": _iso,
    "SimpleViT": _iso,
    "DeepViT": lambda m: dict(_iso(m), depth=len(m.blocks)),  # re-attention sits in its last blocks
    "Xcit": _iso,
    "NaViT": lambda m: dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2),
    "VideoViT": lambda m: dict(img_size=16, num_frames=4, patch_size=4, tubelet_size=2, depth=1, embed_dim=24,
                               num_heads=2),
    "ViViTFactorisedEncoder": lambda m: dict(img_size=16, num_frames=4, patch_size=4, tubelet_size=2, depth=1,
                                             temporal_depth=1, embed_dim=24, num_heads=2),
    "SwinTransformer": lambda m: dict(img_size=32, embed_dim=16, window_size=2, drop_path_rate=0.0,
                                      **{k: v[:len(m.layers)] for k, v in _STAGES4.items()}),
    "SwinTransformerV2": lambda m: dict(img_size=32, embed_dim=16, window_size=2, drop_path_rate=0.0, **_STAGES4),
    "CSwinTransformer": lambda m: dict(img_size=64, embed_dim=16, split_size=(1, 1, 2, 2), drop_path_rate=0.0,
                                       **_STAGES4),
    "PyramidVisionTransformer": lambda m: dict(img_size=64, embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1),
                                               num_heads=(1, 1, 1, 1)),
    "PyramidVisionTransformerV2": lambda m: dict(img_size=64, embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1),
                                                 num_heads=(1, 1, 1, 1)),
    "ResNet": lambda m: dict(img_size=32, layers=(1, 2, 1, 1)),
    "PreActResNet": lambda m: dict(img_size=16, layers=(1, 2, 1, 1)),
    "Twins": lambda m: dict(img_size=32, embed_dims=(8, 16, 24, 32), depths=(2, 2, 1, 1), num_heads=(1, 1, 1, 1)),
    "PoolingVisionTransformer": lambda m: dict(img_size=32, patch_size=8, stride=4, base_dims=(8, 8, 8),
                                               depth=(1, 1, 1), heads=(2, 2, 4)),
    "Nest": lambda m: dict(img_size=32, embed_dims=(16, 32, 32), num_heads=(2, 2, 4), depths=(1, 2, 1)),
    "Levit": lambda m: dict(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1)),
    "ConvolutionalVisionTransformer": lambda m: dict(img_size=32, embed_dims=(16, 32, 32), depths=(1, 1, 1),
                                                     num_heads=(1, 2, 2)),
    "MobileViT": lambda m: dict(img_size=32, stem_chs=8, channels=(8, 16, 16), depths=(1, 1, 1), strides=(1, 2, 2),
                                transformer_dims=(0, 16, 32), transformer_depths=(0, 1, 1), num_heads=2,
                                num_features=32),
    "CrossFormer": lambda m: dict(img_size=32, embed_dim=16, group_size=2, drop_path_rate=0.0, **_STAGES4),
    "ScalableViT": lambda m: dict(img_size=32, embed_dims=(8, 16, 24, 32), wss=(2, 2, 2, 1), head_hidden=32,
                                  drop_path_rate=0.0, **_STAGES4),
    "SepViT": lambda m: dict(img_size=32, embed_dims=(16, 32), num_heads=(2, 2), depths=(2, 2), mlp_ratios=(2, 2),
                             window_size=((2,), (2, 4))),
    "RegionViT": lambda m: dict(img_size=32, embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 2), window_size=2),
    "LookupViT": lambda m: dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, compressed_size=3),
    "MaxViT": lambda m: dict(img_size=64, embed_dim=(16, 16, 32, 32), depths=(1, 2, 1, 1), stem_width=8, dim_head=8,
                             drop_path_rate=0.0),
    "CrossVit": lambda m: dict(embed_dim=(16, 32), depth=((1, 1, 0), (1, 1, 0)), num_heads=(2, 2),
                               **(dict(img_size=120, patch_size=(12, 16))  # dagger stems: 12/16 px only
                                  if isinstance(m.patch_embed[0].proj, nn.Sequential)
                                  else dict(img_size=30, patch_size=(3, 4)))),
    "ConVit": lambda m: dict(_iso(m), embed_dim=16, local_up_to_layer=1),  # embed_dim per head; 1 GPSA block
    "AlterNet": lambda m: dict(img_size=64, layers=(1, 2, 2, 2), msa_counts=(0, 1, 1, 1), window_size=2),
    "VisionTransformerSAM": lambda m: dict(_iso(m), window_size=3, global_attn_indexes=(1,),  # padded 4x4 map
                                           **({"neck_chans": 16} if m.num_features != m.embed_dim else {})),
}
CNNS = ("ResNet", "PreActResNet")  # no attention to record


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return vitlab.create_model(name)


def _out_dim(m: nn.Module) -> int:
    return m.num_classes if m.num_classes else m.num_features


@pytest.mark.parametrize("name", ALL)
def test_default_size_forward_shapes_on_meta(name):
    m = _meta(name).eval()
    out = m(torch.empty(2, *m.default_cfg["input_size"], device="meta"))
    assert tuple(out.shape) == (2, _out_dim(m)), (name, tuple(out.shape))


def small_model(name: str) -> nn.Module:
    cls = type(_meta(name)).__name__
    assert cls in SMALL, f"{name}: class {cls} has no small size in tests/test_catalogue.py SMALL; add one"
    torch.manual_seed(0)
    return vitlab.create_model(name, **SMALL[cls](_meta(name)))


@pytest.mark.parametrize("name", ALL)
def test_small_size_step_intermediates_and_attention(name):
    m = small_model(name).train()
    x = torch.randn(2, *m.default_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    out = m(x)
    out = sum(out) / len(out) if isinstance(out, tuple) else out  # distilled models train with two heads
    assert out.shape == (2, _out_dim(m)) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: no gradient reaches {no_grad[:4]}"
    bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad[:4]}"
    m.eval()
    with torch.no_grad():
        sampled = bool(getattr(m, "in_block", None))  # ATS: tokens after sampling form no map (NLC only)
        feats = m.forward_intermediates(x, intermediates_only=True, output_fmt="NLC" if sampled else "NCHW")
        assert len(feats) >= 1 and all(torch.isfinite(f).all() for f in feats), name
        if type(m).__name__ in CNNS:
            return
        with record_attention(m) as rec:
            m(x)
        probs = rec.last()
    assert probs, f"{name}: record_attention recorded nothing"
    modules = dict(m.named_modules())
    for key, p in probs.items():  # (batch x groups, heads, queries, keys)
        assert torch.isfinite(p).all() and p.shape[0] % 2 == 0, (name, key, tuple(p.shape))
        _check_rows(modules[key], p, f"{name} {key}")


def _check_rows(module: nn.Module, p: torch.Tensor, what: str) -> None:
    """Softmax rows sum to 1; FLatten's rows are divided by their sum plus ``n * 1e-6`` (the released code),
    so they lie in [0, 1]; probabilities re-mixed across heads (talking heads, re-attention) are not rows
    of a distribution any more."""
    if any(getattr(mod, "mixes_heads", False) for mod in getattr(module, "modifiers", ())):
        return
    core = getattr(getattr(module, "core", None), "name", "softmax")
    sums = p.sum(-1)
    if core in ("softmax", "cosine"):
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-4, rtol=0, msg=what)
    else:
        assert p.min() >= 0 and sums.max() <= 1 + 1e-5, what


def test_every_model_has_a_catalogue_entry_and_docs_catalogue_is_current():
    """``docs/catalogue.md`` is ``vitlab models --catalogue``: regenerate it when a model is added."""
    from pathlib import Path

    from vitlab.models.catalogue import catalogue_markdown, entry_for

    assert [n for n in ALL if entry_for(n) is None] == []
    doc = Path(__file__).resolve().parents[1] / "docs" / "catalogue.md"
    assert doc.read_text() == catalogue_markdown(), "run: vitlab models --catalogue > docs/catalogue.md"
