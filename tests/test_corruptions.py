"""Corruptions against the reference package ``imagecorruptions`` (where deterministic), PIL,
scipy and their defining formulas."""

import numpy as np
import pytest
import torch

from vitlab.analysis import CORRUPTIONS, corrupt
from vitlab.analysis import corruptions as C


pytestmark = pytest.mark.usefixtures("one_thread")


def _img(b=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish image quantised to 8 bits, like a real photo
    x = torch.nn.functional.interpolate(torch.rand(b, 3, h // 4, w // 4, generator=g), size=(h, w),
                                        mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def _to_np(x):  # (3, H, W) -> H x W x 3 uint8
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_all_corruptions_keep_shape_and_range_and_change_the_image():
    x = _img(2, 32, 32)
    assert len(CORRUPTIONS) == 15
    for name in CORRUPTIONS:
        for sev in (1, 5):
            y = corrupt(x, name, sev, seed=1)
            assert y.shape == x.shape and y.dtype == x.dtype, name
            assert float(y.min()) >= 0 and float(y.max()) <= 1, name
            assert float((y - x).abs().mean()) > 1e-3, (name, sev)
        assert torch.equal(corrupt(x, name, 0), x)  # severity 0 = clean


def test_severity_increases_damage_for_monotone_corruptions():
    x = _img(4, 32, 32)
    for name in ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "zoom_blur", "contrast",
                 "brightness", "pixelate", "jpeg_compression", "fog"]:
        d = [float((corrupt(x, name, s, seed=3) - x).pow(2).mean()) for s in (1, 3, 5)]
        assert d[0] < d[1] < d[2], (name, d)


def test_identity_parameters_return_the_input():
    x = _img()
    assert torch.allclose(corrupt(x, "gaussian_noise", 1, params=0.0), x)
    assert torch.allclose(corrupt(x, "contrast", 1, params=1.0), x, atol=1e-6)
    assert torch.allclose(corrupt(x, "brightness", 1, params=0.0), x, atol=1e-6)
    assert torch.allclose(corrupt(x, "impulse_noise", 1, params=0.0), x)
    assert torch.allclose(corrupt(x, "pixelate", 1, params=1.0), x, atol=1e-6)
    assert torch.allclose(corrupt(x, "frost", 1, params=(1.0, 0.0)), x)
    assert torch.allclose(corrupt(x, "fog", 1, params=(0.0, 2.0)), x)


def test_noise_statistics_match_their_definitions():
    x = torch.full((4, 3, 64, 64), 0.5)
    y = corrupt(x, "gaussian_noise", 3)  # CIFAR table: sigma 0.08
    assert float((y - x).std()) == pytest.approx(0.08, rel=0.03)
    y = corrupt(x, "shot_noise", 5)  # Poisson(0.5·50)/50: mean 0.5, var 0.5/50
    assert float(y.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(y.var()) == pytest.approx(0.5 / 50, rel=0.05)
    y = corrupt(x, "impulse_noise", 5)  # 7 % of values set to 0 or 1, half each
    frac = float((y != 0.5).double().mean())
    assert frac == pytest.approx(0.07, rel=0.05)
    assert float((y == 1).double().mean()) == pytest.approx(0.035, rel=0.1)


def test_contrast_brightness_defocus_against_reference_package():
    ic = pytest.importorskip("imagecorruptions.corruptions", reason="imagecorruptions not installed")
    x = _img(1, 64, 64)
    arr = _to_np(x[0])
    for sev in (1, 4):
        ref = torch.from_numpy(ic.contrast(arr, sev) / 255).permute(2, 0, 1).float()
        ours = corrupt(x, "contrast", 1, params=C._IMAGENET["contrast"][sev - 1])[0]
        assert torch.allclose(ours, ref, atol=1e-5)
        ref = torch.from_numpy(ic.brightness(arr, sev) / 255).permute(2, 0, 1).float()
        ours = corrupt(x, "brightness", 1, params=C._IMAGENET["brightness"][sev - 1])[0]
        assert torch.allclose(ours, ref, atol=1e-5)
    for c in [(3, 0.1), (6, 0.5), (10, 0.5), (0.5, 0.6), (1.5, 0.1)]:  # ImageNet and CIFAR entries
        kern = ic.disk(radius=c[0], alias_blur=c[1])
        assert torch.allclose(C._disk(*c), torch.from_numpy(kern), atol=1e-6)
        import cv2
        ref = np.stack([cv2.filter2D(arr[:, :, d] / 255.0, -1, kern) for d in range(3)], -1).clip(0, 1)
        ours = corrupt(x, "defocus_blur", 1, params=c)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_motion_blur_against_reference_package():
    ic = pytest.importorskip("imagecorruptions.corruptions", reason="imagecorruptions not installed")
    x = _img(2, 32, 32)
    for (radius, sigma), angle in [((6, 2), 30.0), ((9, 2.5), -40.0)]:
        ours = C._motion_blur(x, radius, sigma, torch.tensor([angle, angle]))
        for j in range(2):
            ref = ic._motion_blur(x[j].permute(1, 2, 0).numpy().astype(np.float32), radius, sigma, angle)
            np.testing.assert_allclose(ours[j].permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_pixelate_and_jpeg_against_pil():
    from io import BytesIO

    from PIL import Image
    x = _img(2, 32, 32)
    for sev in (1, 3, 5):
        c = C._CIFAR["pixelate"][sev - 1]
        ours = corrupt(x, "pixelate", sev)
        for j in range(2):
            im = Image.fromarray(_to_np(x[j]))
            ref = im.resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
            ref = torch.from_numpy(np.asarray(ref) / 255.0).permute(2, 0, 1).float()
            assert float((ours[j] - ref).abs().max()) <= 1.01 / 255
        q = C._CIFAR["jpeg_compression"][sev - 1]
        ours = corrupt(x, "jpeg_compression", sev)
        for j in range(2):
            buf = BytesIO()
            Image.fromarray(_to_np(x[j])).save(buf, "JPEG", quality=q)
            ref = torch.from_numpy(np.asarray(Image.open(buf)) / 255.0).permute(2, 0, 1).float()
            assert float((ours[j] - ref).abs().mean()) < 1.0 / 255, sev


def test_zoom_blur_against_scipy_zoom():
    from scipy.ndimage import zoom as scizoom
    x = _img(1, 32, 32)
    arr = x[0].permute(1, 2, 0).numpy().astype(np.float64)

    def clipped_zoom(img, z):  # the reference definition (CIFAR-10-C)
        h = img.shape[0]
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        img = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        t = (img.shape[0] - h) // 2
        return img[t:t + h, t:t + h]

    factors = np.arange(1, 1.16, 0.01)
    ref = (arr + sum(clipped_zoom(arr, z) for z in factors)) / (len(factors) + 1)
    ours = corrupt(x, "zoom_blur", 3)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, np.clip(ref, 0, 1), atol=1e-5)


def test_size_dependent_tables_and_errors():
    assert C.params_for("defocus_blur", 1, 32) == (0.3, 0.4)  # CIFAR-10-C
    assert C.params_for("defocus_blur", 1, 224) == (3, 0.1)  # ImageNet-C
    x = _img()
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):
        corrupt(x, "gausian_noise", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 3, "fog", 1)
