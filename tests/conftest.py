from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cifar10_root():
    root = SHARED_DATA / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"real CIFAR-10 images not found at {root} (see shared/data/README.md)")
    return root


@pytest.fixture
def one_thread():
    """For tests on tiny tensors: threading only adds overhead (and contention on a busy
    2-core CI box).  Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def plain_linear():
    """The oneDNN linear path off (vitlab.layers.linear): for tests that compare the inference fast paths
    bit for bit with the autograd path, which runs ``addmm``."""
    from vitlab.layers.linear import set_onednn_linear

    previous = set_onednn_linear(False)
    yield
    set_onednn_linear(previous)


def brightness_folder(root: Path, counts: Dict[str, Tuple[int, int]], seed: int, noise: float,
                      levels: Tuple[int, int] = (60, 190), size: int = 8) -> str:
    """An ImageFolder ``root/{split}/{dark,light}/{i}.png`` of ``size`` x ``size`` RGB images: Gaussian
    noise (std ``noise``) around two grey ``levels``, learnable in a few steps.  ``counts`` gives
    ``(dark, light)`` image counts per split, in writing order (the images depend on it)."""
    rng = np.random.default_rng(seed)
    for split, per in counts.items():
        for ci, c in enumerate(("dark", "light")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per[ci]):
                arr = np.clip(levels[ci] + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return str(root)
