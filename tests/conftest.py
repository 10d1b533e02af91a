from pathlib import Path

import pytest
import torch

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
