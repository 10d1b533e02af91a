"""Fine-tuning from weights on disk (issue 17): timm train.py checkpoints read without unpickling
code, a new head, position tables of another size, another number of input channels, model
directories written by every run and read back by vitlab and timm."""
import argparse
import os

import pytest
import torch

import vitlab
from vitlab.errors import UserError
from vitlab.interop.checkpoint import create_pretrained, load_pretrained, read_state_dict, safe_torch_load

KW = dict(embed_dim=32, depth=2, num_heads=2)


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    m = VisionTransformer(img_size=32, patch_size=4, **KW, **kw)
    with torch.no_grad():  # no zero biases / unit gains: a key loaded into the wrong place shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _timm_train_checkpoint(path, model):
    """The layout of timm's train.py CheckpointSaver: args is an argparse.Namespace."""
    args = argparse.Namespace(model="vit_tiny_patch4_32", lr=5e-4, opt="adamw", betas=(0.9, 0.999), sched="cosine",
                              mixup=0.8, data_dir="/data", aa=None)
    torch.save({"epoch": 3, "arch": "vit_tiny_patch4_32", "state_dict": model.state_dict(), "args": args,
                "optimizer": {"state": {}, "param_groups": []}, "version": 2, "metric": 71.5}, path)


def test_timm_train_checkpoint_loads_with_new_head_and_logits_match_timm(tmp_path):
    ref = _timm_vit(num_classes=1000)
    path = tmp_path / "model_best.pth.tar"
    _timm_train_checkpoint(path, ref)
    assert isinstance(safe_torch_load(str(path))["args"], argparse.Namespace)
    # same head: logits equal timm's
    same = vitlab.create_model("vit_tiny_patch4_32", **KW, num_classes=1000).eval()
    rep = load_pretrained(same, str(path))
    assert not rep.adapted and not rep.new and len(rep.loaded) == len(same.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref(x), atol=1e-5, rtol=1e-5)
    # fine-tuning: 10 classes and 16 px; the head starts afresh, pos_embed is resampled
    m, rep = create_pretrained("vit_tiny_patch4_32", str(path), **KW, num_classes=10, img_size=16)
    sd = m.state_dict()
    assert sorted(rep.new) == ["head.bias", "head.weight"] and sd["head.weight"].shape == (10, 32)
    assert "pos_embed" in rep.adapted and sd["pos_embed"].shape == (1, 1 + 16, 32)
    from timm.layers import resample_abs_pos_embed

    want = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[4, 4], old_size=[8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(sd["pos_embed"], want)
    torch.testing.assert_close(sd["blocks.1.attn.qkv.bias"], ref.state_dict()["blocks.1.attn.qkv.bias"])
    assert "loaded" in rep.summary() and "head.weight" in rep.summary()


def test_first_conv_is_adapted_to_one_channel_by_timms_rule(tmp_path):
    ref = _timm_vit(num_classes=10)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    m = vitlab.create_model("vit_tiny_patch4_32", **KW, num_classes=10, in_chans=1)
    rep = load_pretrained(m, str(path))
    w = ref.patch_embed.proj.weight.detach()
    torch.testing.assert_close(m.state_dict()["patch_embed.proj.weight"], w.sum(dim=1, keepdim=True))
    assert rep.adapted["patch_embed.proj.weight"] == "in_chans 3 -> 1" and not rep.new


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Evil()}, path)
    with pytest.raises(UserError, match="without running code") as e:
        read_state_dict(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


def test_wrong_architecture_is_a_one_line_error_naming_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(_timm_vit(num_classes=10).state_dict(), str(path))
    m = vitlab.create_model("vit_tiny_patch4_32", embed_dim=32, depth=3, num_heads=2, num_classes=10)
    with pytest.raises(UserError, match=r"missing blocks\.2\.") as e:
        load_pretrained(m, str(path))
    assert "\n" not in str(e.value)
    m = vitlab.create_model("vit_tiny_patch4_32", embed_dim=48, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(UserError, match=r"has shape \(32,\) but the model needs \(48,\)"):
        load_pretrained(m, str(path))


def test_train_pretrained_run_writes_model_files_that_vitlab_and_timm_load(tmp_path):
    """``vitlab train --pretrained`` (a timm file, another class count) fine-tunes; the run ends with
    model.safetensors + config.json that create_pretrained and timm.create_model read to equal logits."""
    import timm
    from conftest import brightness_folder

    from vitlab.cli import main

    src = tmp_path / "timm.pth.tar"
    _timm_train_checkpoint(src, _timm_vit(num_classes=1000))
    folder = brightness_folder(tmp_path / "imgs", {"train": (6, 6), "val": (3, 3)}, seed=0, noise=30)
    out = tmp_path / "run"
    argv = ["train", "--data", folder, "--out", str(out), "--model", "vit_tiny_patch16_224", "--model-kwargs",
            "embed_dim=32,depth=2,num_heads=2,patch_size=4", "--img-size", "8", "--pretrained", str(src),
            "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "0", "--threads", "1",
            "--workers", "0", "--no-progress", "--amp", "none"]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    mine, rep = create_pretrained(None, str(out))
    assert not rep.new and not rep.adapted
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in ck["model"].items())
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=2, img_size=8, patch_size=4,
                               embed_dim=32, depth=2, num_heads=2,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), mine.eval()(x), atol=1e-5, rtol=1e-5)
    # the fine-tuned blocks started from the timm weights: closer to them than to a fresh init
    start = _timm_vit(num_classes=1000).state_dict()["blocks.0.mlp.fc1.weight"]
    assert (ck["model"]["blocks.0.mlp.fc1.weight"] - start).abs().max() < 0.05
