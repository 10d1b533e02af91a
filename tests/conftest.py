import os
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
