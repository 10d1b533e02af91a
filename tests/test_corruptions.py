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


# -- the five random corruptions against the reference, with its numpy draws replayed ----------
# The reference draws from numpy's global RNG; vitlab from a torch generator.  Each test makes the
# same torch draws vitlab makes (same seed, same order) and feeds them to the reference through a
# patched numpy.random function, so both compute from identical random numbers.

class _Replay:
    def __init__(self, values):
        self.values = list(values)

    def __call__(self, *args, **kwargs):
        return self.values.pop(0)


@pytest.fixture
def ic(monkeypatch):
    ref = pytest.importorskip("imagecorruptions.corruptions", reason="imagecorruptions not installed")
    from skimage.filters import gaussian
    # the package predates skimage's channel_axis and NumPy 2's removal of np.float_
    monkeypatch.setattr(ref, "gaussian", lambda im, sigma, multichannel=None, **kw: gaussian(
        im, sigma=sigma, channel_axis=-1 if multichannel else None, **kw))
    monkeypatch.setattr(np, "float_", np.float64, raising=False)
    return ref


def _hwc(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("sev", [1, 3])
def test_glass_blur_against_reference_package(ic, monkeypatch, sev):
    x = _img(1, 32, 32)
    c = C._IMAGENET["glass_blur"][sev - 1]
    g = torch.Generator().manual_seed(3)
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: torch.randint(-c[1], c[1], (2,), generator=g).numpy())
    ref = ic.glass_blur(_to_np(x[0]), sev) / 255
    ours = _hwc(corrupt(x, "glass_blur", 1, params=c, generator=torch.Generator().manual_seed(3))[0])
    np.testing.assert_allclose(ours, ref, atol=1e-6)  # the reference duplicates pixels (see glass_blur)


@pytest.mark.parametrize("size,sev", [(32, 1), (32, 3), (32, 5), (224, 5)])
def test_snow_against_reference_package(ic, monkeypatch, size, sev):
    x = _img(1, size, size)
    c = C._IMAGENET["snow"][sev - 1]
    g = torch.Generator().manual_seed(7)
    layer = (c[0] + c[1] * torch.randn(1, 1, size, size, generator=g, dtype=torch.float64))[0, 0].numpy()
    angle = float(torch.rand(1, generator=g, dtype=torch.float64) * 90 - 135)
    monkeypatch.setattr(np.random, "normal", _Replay([layer]))
    monkeypatch.setattr(np.random, "uniform", _Replay([angle]))
    ref = ic.snow(_to_np(x[0]), sev) / 255
    ours = _hwc(corrupt(x, "snow", 1, params=c, generator=torch.Generator().manual_seed(7))[0])
    # imagecorruptions blurs the zoomed snow layer before cropping it (make_imagenet_c.py crops first, as
    # vitlab does): at 224 px the zoomed layer is one pixel larger, so a 2-pixel frame may differ
    d = np.abs(ours - ref)[2:-2, 2:-2]
    assert d.max() <= 1 / 255 + 1e-6  # 8-bit rounding of the snow layer may flip by one level
    assert (d > 1e-5).mean() < 1e-3


@pytest.mark.parametrize("size,sev", [(32, 1), (32, 5), (64, 3)])
def test_fog_against_reference_package(ic, monkeypatch, size, sev):
    x = _img(1, size, size)
    c = C._IMAGENET["fog"][sev - 1]
    g = torch.Generator().manual_seed(5)  # the plasma fractal's uniform draws, in the reference's order
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: (
        torch.rand(size, generator=g, dtype=torch.float64) * (high - low) + low).numpy())
    ref = ic.fog(_to_np(x[0]), sev) / 255
    ours = _hwc(corrupt(x, "fog", 1, params=c, generator=torch.Generator().manual_seed(5))[0])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def _frost_draws(size, seed):
    """vitlab's draws for one image: texture index and crop origin."""
    g = torch.Generator().manual_seed(seed)
    idx = int(torch.randint(0, 5, (1,), generator=g))
    t = C._frost_texture(idx, size, size)
    y0 = int(torch.randint(0, max(t.shape[1] - size, 1), (1,), generator=g))
    x0 = int(torch.randint(0, max(t.shape[2] - size, 1), (1,), generator=g))
    return idx, y0, x0


def test_frost_against_reference_package_for_every_texture(ic, monkeypatch):
    x, sev = _img(1, 224, 224), 3
    c = C._IMAGENET["frost"][sev - 1]
    seen = set()
    for seed in range(60):
        idx, y0, x0 = _frost_draws(224, seed)
        if idx in seen:
            continue
        seen.add(idx)
        monkeypatch.setattr(np.random, "randint", _Replay([idx, y0, x0]))
        ref = ic.frost(_to_np(x[0]), sev) / 255
        ours = _hwc(corrupt(x, "frost", 1, params=c, generator=torch.Generator().manual_seed(seed))[0])
        d = np.abs(ours - ref)
        # PIL vs OpenCV JPEG decoding / cubic rounding: a texture pixel may differ by one 8-bit level
        assert d.max() <= c[1] / 255 + 1e-5, (idx, d.max())
        assert (d > 1e-5).mean() < 1e-3, idx
    assert seen == set(range(5))


def test_frost_at_cifar_size_against_make_cifar_c_definition():
    cv2 = pytest.importorskip("cv2")
    import importlib.util
    import os
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None:
        pytest.skip("imagecorruptions (the frost photographs) not installed")
    base = os.path.join(list(spec.submodule_search_locations)[0], "frost")
    names = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
    x = _img(1, 32, 32)
    for seed, sev in ((0, 1), (1, 5), (2, 3)):
        c = C._CIFAR["frost"][sev - 1]
        idx, y0, x0 = _frost_draws(32, seed)
        # make_cifar_c.py: frost = cv2.resize(cv2.imread(f), (0, 0), fx=0.2, fy=0.2); random 32x32 crop; BGR->RGB
        frost = cv2.resize(cv2.imread(os.path.join(base, names[idx])), (0, 0), fx=0.2, fy=0.2)
        frost = frost[y0:y0 + 32, x0:x0 + 32][..., [2, 1, 0]]
        ref = np.clip(c[0] * _to_np(x[0]) + c[1] * frost, 0, 255) / 255
        ours = _hwc(corrupt(x, "frost", sev, generator=torch.Generator().manual_seed(seed))[0])
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def _elastic_reference(image, c, jitter, dx_field, dy_field):
    """elastic_transform of make_imagenet_c.py / make_cifar_c.py (Hendrycks & Dietterich), with
    ``c`` = (alpha, sigma, affine jitter) in pixels and the uniform draws passed in."""
    cv2 = pytest.importorskip("cv2")
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian
    image = np.array(image, dtype=np.float32) / 255.
    shape = image.shape
    shape_size = shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32([center_square + square_size, [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])
    pts2 = pts1 + jitter.astype(np.float32)
    image = cv2.warpAffine(image, cv2.getAffineTransform(pts1, pts2), shape_size[::-1],
                           borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian(dx_field, c[1], mode='reflect', truncate=3) * c[0]).astype(np.float32)[..., None]
    dy = (gaussian(dy_field, c[1], mode='reflect', truncate=3) * c[0]).astype(np.float32)[..., None]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    return np.clip(map_coordinates(image, indices, order=1, mode='reflect').reshape(shape), 0, 1)


@pytest.mark.parametrize("size,sev", [(32, 1), (32, 2), (32, 5), (224, 2), (224, 5)])
def test_elastic_transform_against_its_reference_definition(size, sev):
    """The imagecorruptions package replaced Hendrycks' elastic transform (no affine part), so
    the reference here is the original code, written out above, fed vitlab's draws."""
    x = _img(1, size, size)
    scale = size if size < 100 else size * 244 / 224  # the tables are per image side; ImageNet-C used 244
    c = [v * scale for v in C.params_for("elastic_transform", sev, size)]
    g = torch.Generator().manual_seed(9)
    jitter = ((torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1) * c[2]).numpy()
    field = (torch.rand(2, size, size, generator=g, dtype=torch.float64) * 2 - 1).numpy()
    ref = _elastic_reference(_to_np(x[0]), c, jitter, field[0], field[1])
    ours = _hwc(corrupt(x, "elastic_transform", sev, generator=torch.Generator().manual_seed(9))[0])
    np.testing.assert_allclose(ours, ref, atol=2e-5)  # borders included (reflect modes as the reference's)
