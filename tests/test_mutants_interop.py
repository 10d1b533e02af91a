"""Tests for mutants that survived mutmut over ``vitlab.interop.checkpoint`` (issue 18, item 7): prefix
cleaning (DDP, torch.compile), the EMA and state-dict keys of training checkpoints, safetensors files,
timm key conversion through a family converter, and the report of what was loaded, adapted and ignored."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vitlab
from vitlab.errors import UserError
from vitlab.interop.checkpoint import PretrainedReport, create_pretrained, load_pretrained, read_state_dict

KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return vitlab.create_model("vit_tiny_patch16_224", **{**KW, **kw}).eval()


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_stripped(tmp_path, prefix):
    src = _model(1)
    torch.save({"state_dict": {prefix + k: v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    sd = read_state_dict(str(tmp_path / "w.pth"))
    assert set(sd) == set(src.state_dict())
    dst = _model(2)
    load_pretrained(dst, str(tmp_path / "w.pth"))
    assert _same(src, dst)


@pytest.mark.parametrize("key", ["ema", "state_dict_ema", "model_ema"])
def test_ema_weights_come_from_each_known_key(tmp_path, key):
    model, ema = _model(1), _model(2)
    torch.save({"model": model.state_dict(), key: ema.state_dict()}, tmp_path / "c.pth")
    got = _model(3)
    load_pretrained(got, str(tmp_path / "c.pth"), ema=True)
    assert _same(got, ema)
    load_pretrained(got, str(tmp_path / "c.pth"))  # ema=False: the model weights, never the EMA
    assert _same(got, model)


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict"])
def test_model_weights_come_from_each_known_key(tmp_path, key):
    model = _model(1)
    torch.save({key: model.state_dict(), "epoch": 3}, tmp_path / "c.pth")
    assert set(read_state_dict(str(tmp_path / "c.pth"))) == set(model.state_dict())
    with pytest.raises(UserError, match=r"holds no EMA weights \(looked for ema, state_dict_ema, model_ema\)"):
        read_state_dict(str(tmp_path / "c.pth"), ema=True)


def test_empty_dict_and_safetensors(tmp_path):
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match="holds no state dict.*got dict"):
        read_state_dict(str(tmp_path / "empty.pth"))
    model = _model(1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    got = _model(2)
    rep = load_pretrained(got, str(tmp_path / "m.safetensors"))
    assert _same(got, model) and rep.path == str(tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read .*bad.safetensors as safetensors"):
        read_state_dict(str(tmp_path / "bad.safetensors"))


def test_timm_keys_are_converted_by_the_family_converter(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32,
                            num_heads=2, num_classes=7).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(ref.state_dict(), tmp_path / "cait.pth")
    ours = vitlab.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32,
                               num_heads=2, num_classes=7).eval()
    assert set(ours.state_dict()) != set(ref.state_dict())  # the converter is needed
    rep = load_pretrained(ours, str(tmp_path / "cait.pth"))
    assert not rep.new and not rep.ignored and not rep.adapted
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_report_names_adapted_new_and_ignored_keys(tmp_path):
    src = _model(1, num_classes=10)
    sd = dict(src.state_dict(), extra_unused=torch.zeros(3))
    torch.save(sd, tmp_path / "w.pth")
    dst = _model(2, num_classes=5, img_size=48, in_chans=1)
    rep = load_pretrained(dst, str(tmp_path / "w.pth"))
    assert rep.ignored == ["extra_unused"] and rep.new == ["head.bias", "head.weight"]
    assert rep.adapted == {"patch_embed.proj.weight": "in_chans 3 -> 1",
                           "pos_embed": "resized (1, 17, 32) -> (1, 37, 32)"}
    assert set(rep.loaded) == set(sd) - {"extra_unused", "head.weight", "head.bias", "patch_embed.proj.weight",
                                         "pos_embed"}
    text = rep.summary()
    assert text.startswith(f"loaded {len(rep.loaded)} tensors from {tmp_path / 'w.pth'} as they are; adapted "
                           "pos_embed (resized (1, 17, 32) -> (1, 37, 32)); patch_embed.proj.weight (in_chans 3 -> 1)")
    assert text.endswith("; newly initialised head.bias, head.weight; ignored extra_unused")
    many = PretrainedReport("p", ignored=[f"k{i}" for i in range(9)])
    assert many.summary().endswith("ignored k0, k1, k2, k3, k4, k5, k6, k7 ...")
    assert not PretrainedReport("p", ignored=[f"k{i}" for i in range(8)]).summary().endswith("...")


def test_missing_keys_are_named(tmp_path):
    sd = _model(1).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.")}, tmp_path / "w.pth")
    with pytest.raises(UserError) as err:
        load_pretrained(_model(2), str(tmp_path / "w.pth"))
    missing = [k for k in sd if k.startswith("blocks.")]
    assert f"missing {', '.join(missing[:8])} ... ({len(missing)} keys; is it another architecture?)" in str(err.value)
    assert "does not fit VisionTransformer" in str(err.value)


def test_create_pretrained_reads_the_model_directory(tmp_path):
    src = _model(1)
    from vitlab.interop.checkpoint import save_model_files

    save_model_files(src, str(tmp_path / "d"), "vit_tiny_patch16_224", KW)
    got, rep = create_pretrained(None, str(tmp_path / "d"))
    assert _same(got, src) and not rep.adapted and not rep.new
    got, rep = create_pretrained(None, str(tmp_path / "d"), num_classes=3)  # user kwargs win over config.json
    assert got.num_classes == 3 and rep.new == ["head.bias", "head.weight"]


def test_load_weights_strict_and_not(tmp_path):
    from vitlab.interop.checkpoint import load_weights

    src = _model(1)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = _model(2)
    assert load_weights(dst, str(tmp_path / "w.pth")) is dst and _same(dst, src)
    other = _model(3, num_classes=4)
    with pytest.raises(RuntimeError, match="size mismatch for head"):  # strict: a head of another size is an error
        load_weights(other, str(tmp_path / "w.pth"))
    assert load_weights(other, str(tmp_path / "w.pth"), strict=False) is other  # not strict: a new head
    torch.save({k: v for k, v in src.state_dict().items() if k != "norm.bias"}, tmp_path / "part.pth")
    with pytest.raises(RuntimeError, match="Missing key.*norm.bias"):  # strict: nothing may be missing
        load_weights(_model(4), str(tmp_path / "part.pth"))
    sd = other.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items() if not k.startswith("head."))


def test_a_pickle_with_code_is_refused_with_the_first_line_of_the_reason(tmp_path):
    from vitlab.interop.checkpoint import safe_torch_load

    torch.save({"fn": _model}, tmp_path / "code.pth")  # a function: unpickling would import and run code
    with pytest.raises(UserError) as err:
        safe_torch_load(str(tmp_path / "code.pth"))
    msg = str(err.value)
    assert msg.startswith(f"cannot read {tmp_path / 'code.pth'} as a weights file without running code from it: ")
    assert "\n" not in msg and "Weights only load failed" in msg
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match="without running code from it: .+"):
        safe_torch_load(str(tmp_path / "empty.pth"))


def test_model_files_hold_timm_keys_and_a_complete_config(tmp_path):
    import json

    from safetensors.torch import load_file

    from vitlab.interop.checkpoint import save_model_files

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32, num_heads=2, num_classes=3)
    cait = vitlab.create_model("cait_xxs24_224", **kw)
    weights, config = save_model_files(cait, str(tmp_path / "d"), "cait_xxs24_224", kw, classes=["a", "b", "c"],
                                       extra_cfg={"mean": [0.5]})
    timm = pytest.importorskip("timm")
    ref = timm.create_model("cait_xxs24_224", **kw)
    assert set(load_file(weights)) == set(ref.state_dict())  # timm's layout, so timm can read the file
    cfg = json.loads(open(config).read())
    assert cfg["architecture"] == "cait_xxs24_224" and cfg["num_classes"] == 3 and cfg["num_features"] == 32
    assert cfg["model_args"] == kw and cfg["label_names"] == ["a", "b", "c"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["mean"] == [0.5]
    vit = _model(1)
    weights, config = save_model_files(vit, str(tmp_path / "v"), "vit_tiny_patch16_224", KW)
    assert json.loads(open(config).read())["label_names"] is None
    back, _ = create_pretrained(None, str(tmp_path / "v"))
    assert _same(back, vit)


def test_create_pretrained_takes_the_ema_weights(tmp_path):
    model, ema = _model(1), _model(2)
    torch.save({"model": model.state_dict(), "state_dict_ema": ema.state_dict()}, tmp_path / "c.pth")
    got, _ = create_pretrained("vit_tiny_patch16_224", str(tmp_path / "c.pth"), ema=True, **KW)
    assert _same(got, ema)


def test_distilled_heads_both_start_afresh_and_vitlab_keys_pass_the_converter_by(tmp_path):
    kw = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    src = vitlab.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **kw)
    torch.save(src.state_dict(), tmp_path / "d.pth")
    dst = vitlab.create_model("deit_tiny_distilled_patch16_224", num_classes=4, **kw)
    rep = load_pretrained(dst, str(tmp_path / "d.pth"))  # the classifier is a (head, head_dist) pair
    assert rep.new == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    cait_kw = dict(img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32, num_heads=2)
    cait = vitlab.create_model("cait_xxs24_224", **cait_kw)
    torch.save(dict(cait.state_dict(), junk=torch.zeros(1)), tmp_path / "c.pth")  # vitlab's keys plus one
    back = vitlab.create_model("cait_xxs24_224", **cait_kw)
    rep = load_pretrained(back, str(tmp_path / "c.pth"))
    assert rep.ignored == ["junk"] and _same(back, cait)


def test_model_files_of_a_model_timm_lacks_keep_vitlab_keys(tmp_path):
    from safetensors import safe_open

    from vitlab.interop.checkpoint import save_model_files

    kw = dict(img_size=32, embed_dims=(16, 32, 32), depths=(1, 1, 1), num_heads=(1, 2, 2))
    cvt = vitlab.create_model("cvt_13_224", **kw)
    weights, _ = save_model_files(cvt, str(tmp_path / "d"), "cvt_13_224", kw)
    with safe_open(weights, "pt") as f:
        assert set(f.keys()) == set(cvt.state_dict()) and f.metadata() == {"format": "pt"}
    back, rep = create_pretrained(None, str(tmp_path / "d"))
    assert _same(back, cvt) and not rep.new
