"""ResNet-50 (timm parity) and the pre-activation ResNet-50 of Park & Kim."""
import pytest
import torch

import vitlab
from vitlab.interop import load_timm_weights, to_timm_state_dict
from vitlab.models.cli import count_params

timm = pytest.importorskip("timm")


def test_resnet50_params_equal_timm():
    assert count_params(vitlab.create_model("resnet50")) == count_params(timm.create_model("resnet50")) \
        == 25_557_032


@pytest.mark.parametrize("name,params_m", [("preact_resnet50", 25.55), ("preact_resnet50_cifar", 23.70),
                                           ("resnet50_cifar", 23.71)])
def test_resnet_variants_match_spec(name, params_m):  # how_vits_work.md reference table
    assert abs(count_params(vitlab.create_model(name)) / 1e6 - params_m) / params_m < 0.01


def test_resnet50_timm_parity_both_directions():
    from parity import check_parity

    # every parameter and BatchNorm statistic randomised; 64 px keeps it fast
    check_parity("resnet50", x=torch.randn(2, 3, 64, 64))


def test_resnet_intermediates_and_part_errors():
    m = vitlab.create_model("resnet50", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    inter = m.forward_halves(x)
    assert [i.kind for i in inter[:2]] == ["embed", "downsample"]
    assert [i.kind for i in inter[2:]] == ["conv"] * 16
    assert inter[2].feature.shape == (1, 256, 16, 16) and inter[-1].feature.shape == (1, 2048, 2, 2)
    torch.testing.assert_close(m.fc(inter[-1].feature.mean((2, 3))), m(x))
    with pytest.raises(ValueError, match="BatchNorm"):
        vitlab.create_model("resnet50", norm="center")
    with pytest.raises(ValueError, match="alternet50"):
        vitlab.create_model("resnet50", mixer="cosine")
    with pytest.raises(ValueError, match="stem"):
        vitlab.create_model("resnet50", stem="tiny")


def test_preact_bottleneck_matches_reference():
    from vitlab.models.resnet import PreActBottleneck

    b = PreActBottleneck(64, 32, stride=2).eval()
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 64, 8, 8)
    bn = lambda m, t: torch.nn.functional.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias)  # noqa
    pre = torch.relu(bn(b.norm1, x))
    y = b.conv3(torch.relu(bn(b.norm3, b.conv2(torch.relu(bn(b.norm2, b.conv1(pre)))))))
    torch.testing.assert_close(b(x), y + b.downsample(pre))
