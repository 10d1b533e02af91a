"""Exact parameter counts for every model vitlab registers under a timm name: timm is the exact
reference (``sum(p.numel())`` equal, not within 1 %)."""
import contextlib
from unittest import mock

import pytest
import timm
import torch

import vitlab

SHARED = [n for n in vitlab.list_models() if timm.list_models(n) == [n]]


def _count(create, name):
    try:  # meta device: no memory, no init
        with torch.device("meta"):
            return sum(p.numel() for p in create(name).parameters())
    except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values
        with _no_init():
            return sum(p.numel() for p in create(name).parameters())


@contextlib.contextmanager
def _no_init():
    """Initialisers as no-ops (the count does not depend on the values)."""
    with contextlib.ExitStack() as stack:
        for name in ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_",
                     "xavier_uniform_", "xavier_normal_", "constant_", "zeros_", "ones_"):
            stack.enter_context(mock.patch.object(torch.nn.init, name, lambda t, *a, **k: t))
        yield


def test_every_shared_family_is_counted():
    for family in ("vit_", "deit_", "cait_", "swin_", "pvt_v2_", "resnet50"):
        assert any(n.startswith(family) for n in SHARED), family


@pytest.mark.parametrize("name", SHARED)
def test_param_count_equals_timm_exactly(name):
    assert _count(vitlab.create_model, name) == _count(timm.create_model, name)
