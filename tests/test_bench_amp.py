"""`vitlab bench --amp` (issue 17): bf16 autocast reaches the model's layers in inference and training
steps, `auto` resolves as in `vitlab train` (bf16 on a native-bf16 CPU for a model >= 192 wide), and
the JSON says which dtype ran.  The dtype is observed inside the model (a forward hook on every
``nn.Linear``)."""
import json

import pytest
import torch
from torch import nn

import vitlab
from vitlab.bench import StepSpec, make_step
from vitlab.cli import main
from vitlab.engine import amp as amp_mod

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def linear_dtypes():
    """The output dtype of every Linear call, in call order."""
    seen = []

    def hook(module, args, out):
        if isinstance(module, nn.Linear):
            seen.append(out.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_step_computes_in_the_autocast_dtype(linear_dtypes, train, amp, dtype):
    model = vitlab.create_model("vit_tiny_patch4_28", embed_dim=16, depth=1, num_heads=2)
    before = model.head.weight.detach().clone()
    make_step(model, StepSpec(batch_size=2, input_size=(1, 28, 28), train=train, amp=amp))()
    assert linear_dtypes and set(linear_dtypes) == {dtype}
    # the weights stay float32 (autocast casts copies); a training step still updates them
    assert model.head.weight.dtype == torch.float32
    assert torch.equal(model.head.weight, before) != train


@pytest.mark.parametrize("amp,native,want", [("bf16", "0", "bf16"), ("none", "1", "none"), ("auto", "1", "bf16"),
                                             ("auto", "0", "none")])
def test_cli_amp(monkeypatch, capsys, linear_dtypes, amp, native, want):
    monkeypatch.setenv("VITLAB_NATIVE_BF16", native)
    amp_mod.cpu_has_native_bf16.cache_clear()
    try:
        rc = main(["bench", "--model", "vit_tiny_patch4_28", "--img-size", "8", "--batch-size", "2", "--runs", "1",
                   "--warmup", "0", "--no-roofline", "--json", "--amp", amp])
    finally:
        amp_mod.cpu_has_native_bf16.cache_clear()
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["amp"] == want and out["amp_requested"] == amp
    # the last step run is a timed one (FLOP counting runs its own float32 pass first)
    n = sum(isinstance(m, nn.Linear) for m in vitlab.create_model("vit_tiny_patch4_28", img_size=8).modules())
    assert len(linear_dtypes) > n and set(linear_dtypes[-n:]) == {torch.bfloat16 if want == "bf16" else torch.float32}
