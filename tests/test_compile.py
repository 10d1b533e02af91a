"""``--compile``: training through ``torch.compile`` (inductor, CPU C++ code generation) gives the
eager run's weights, and its checkpoints hold the plain module's keys; compiled inference equals
the eager fast path."""
import shutil

import pytest
import torch
from conftest import brightness_folder
from test_engine import tiny_cfg

from vitlab.engine.trainer import train

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")


def test_compiled_training_matches_eager_and_checkpoints_plain_keys(tmp_path):
    folder = brightness_folder(tmp_path / "imgs", {"train": (8, 8), "val": (4, 4)}, seed=0, noise=30)
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        s = train(tiny_cfg(folder, tmp_path / name, epochs=1, compile=compile_))
        runs[name] = s, torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
    (se, ce), (sc, cc) = runs["eager"], runs["compiled"]
    assert ce["model"].keys() == cc["model"].keys()  # no "_orig_mod." prefix
    for k, v in ce["model"].items():
        torch.testing.assert_close(cc["model"][k], v, atol=1e-4, rtol=1e-3)  # lr 1e-2: 4 AdamW steps move ~4e-2
    assert (sc["steps"], sc["top1"]) == (se["steps"], se["top1"])
    assert abs(sc["nll"] - se["nll"]) < 1e-4


def test_compiled_inference_equals_eager_fast_path():
    """Under ``inference_mode`` eager runs the in-place / chunked fast paths, the compiled graph
    the plain ops (inductor fuses instead): the outputs agree."""
    import vitlab

    torch.manual_seed(0)
    m = vitlab.create_model("vit_tiny_patch4_32", mixer="focused_linear", depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        eager = m(x)
        compiled = torch.compile(m)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["no_grad", "bf16"])
def test_inference_compiles_to_one_graph(mode):
    """The fast paths' eligibility checks are folded by dynamo (no graph break at any linear layer), also under
    ``no_grad`` and bf16 autocast, where eager takes the oneDNN path."""
    import contextlib

    import torch._dynamo as dynamo

    import vitlab

    m = vitlab.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), amp:
        explained = dynamo.explain(m)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
