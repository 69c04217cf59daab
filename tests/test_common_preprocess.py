"""xray.common.image_spec.ImageSpec and xray.common.preprocess.preprocess (parity with torchvision)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xray.common.errors import XrayError
from xray.common.image_spec import IMAGENET_MEAN, IMAGENET_STD, ImageSpec
from xray.common.preprocess import preprocess, preprocess_batch, resize_and_crop

# ------------------------------------------------------------------------------------------ ImageSpec


def test_defaults_are_valid():
    s = ImageSpec()
    assert s.input_size == 224 and s.resize_size >= s.input_size
    assert s.channels == 3
    assert s.mean == IMAGENET_MEAN and s.std == IMAGENET_STD
    assert isinstance(s.mean, tuple) and isinstance(s.std, tuple)


@pytest.mark.parametrize("spec", [
    ImageSpec(),
    ImageSpec(input_size=192, resize_size=220, resize_mode="shorter_side", interpolation="bicubic"),
    ImageSpec(input_size=64, resize_size=64, channels=1, mean=(0.5,), std=(0.25,), interpolation="lanczos"),
])
def test_json_round_trip(spec):
    text = spec.to_json()
    assert json.loads(text)["input_size"] == spec.input_size
    back = ImageSpec.from_json(text)
    assert back == spec
    assert hash(back) == hash(spec)
    assert ImageSpec.from_dict(spec.to_dict()) == spec


def test_from_dict_lists_become_tuples():
    s = ImageSpec.from_dict({"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]})
    assert s.mean == (0.1, 0.2, 0.3) and s.std == (1.0, 1.0, 1.0)
    assert s == ImageSpec(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(XrayError, match="unknown"):
        ImageSpec.from_dict({"input_size": 224, "colour": "blue"})


@pytest.mark.parametrize("bad", [
    {"input_size": 4, "resize_size": 4},  # too small
    {"input_size": 224, "resize_size": 200},  # resize < input
    {"resize_mode": "crop"},
    {"interpolation": "area"},
    {"channels": 2, "mean": [0.5, 0.5], "std": [0.5, 0.5]},
    {"channels": 1},  # mean/std still have 3 values
    {"mean": [0.5, 0.5]},
    {"std": [0.2, 0.0, 0.2]},
    {"std": [0.2, -1.0, 0.2]},
    {"input_size": "224"},  # wrong type
    {"mean": None},
])
def test_from_dict_rejects_bad_values(bad):
    with pytest.raises(XrayError):
        ImageSpec.from_dict(bad)


def test_from_dict_rejects_non_numeric_mean_as_xray_error():
    # a hand-edited or corrupt spec.json is user input: it must be an XrayError, not a ValueError traceback
    with pytest.raises(XrayError):
        ImageSpec.from_dict({"mean": ["a", "b", "c"]})


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", '{"input_size": 4}', "123", "null"])
def test_from_json_rejects_bad_text(text):
    with pytest.raises(XrayError):
        ImageSpec.from_json(text)


def test_with_size_keeps_ratio_and_other_fields():
    s = ImageSpec(input_size=224, resize_size=256, resize_mode="shorter_side", interpolation="bicubic")
    t = s.with_size(112)
    assert (t.input_size, t.resize_size) == (112, 128)
    assert (t.resize_mode, t.interpolation, t.channels, t.mean, t.std) == \
        (s.resize_mode, s.interpolation, s.channels, s.mean, s.std)
    u = s.with_size(300)
    assert (u.input_size, u.resize_size) == (300, 343)  # 300 * 256 / 224 = 342.86
    assert s.with_size(224) == s
    assert s.input_size == 224  # frozen original unchanged
    with pytest.raises(XrayError):
        s.with_size(4)


def test_spec_is_frozen():
    with pytest.raises(Exception):
        ImageSpec().input_size = 10  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ preprocess


def _gray(w, h, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content plus noise so every interpolation filter matters
    base = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))
    arr = np.clip(base + rng.normal(0, 20, size=(h, w)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L")


def test_output_shape_and_dtype_3_channels():
    spec = ImageSpec(input_size=32, resize_size=40)
    out = preprocess(_gray(50, 70), spec)
    assert out.shape == (3, 32, 32)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    # gray is replicated: channels differ only by their normalisation
    np.testing.assert_allclose(out[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0],
                               out[2] * IMAGENET_STD[2] + IMAGENET_MEAN[2], atol=1e-6)


def test_output_shape_1_channel():
    spec = ImageSpec(input_size=16, resize_size=20, channels=1, mean=(0.5,), std=(0.25,))
    out = preprocess(_gray(30, 25), spec)
    assert out.shape == (1, 16, 16)
    assert out.dtype == np.float32


@pytest.mark.parametrize("value", [0, 37, 128, 255])
def test_constant_image_values(value):
    spec = ImageSpec(input_size=24, resize_size=28)
    img = Image.new("L", (40, 31), value)
    out = preprocess(img, spec)
    for c in range(3):
        expected = (value / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(out[c], expected, atol=1e-5)


def test_preprocess_batch():
    spec = ImageSpec(input_size=16, resize_size=16)
    imgs = [_gray(20, 30, seed=s) for s in range(3)]
    batch = preprocess_batch(imgs, spec)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(imgs[1], spec))


@pytest.mark.parametrize("mode", ["RGB", "I;16", "F", "1", "P", "RGBA"])
def test_rejects_non_L(mode):
    img = Image.new(mode, (20, 20))
    with pytest.raises(ValueError, match="'L'"):
        preprocess(img, ImageSpec(input_size=16, resize_size=16))


def test_does_not_modify_input():
    img = _gray(40, 30)
    before = np.asarray(img).copy()
    preprocess(img, ImageSpec(input_size=16, resize_size=20))
    assert img.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(img), before)


# torchvision parity ---------------------------------------------------------------------------------

SIZES = [(300, 500), (500, 300), (256, 256), (13, 9), (64, 257)]  # portrait, landscape, square, tiny, thin


def _torchvision_pipeline(spec: ImageSpec):
    from torchvision import transforms
    interp = {"bilinear": transforms.InterpolationMode.BILINEAR,
              "bicubic": transforms.InterpolationMode.BICUBIC}[spec.interpolation]
    size = spec.resize_size if spec.resize_mode == "shorter_side" else (spec.resize_size, spec.resize_size)
    return transforms.Compose([
        transforms.Resize(size, interpolation=interp),
        transforms.CenterCrop(spec.input_size),
        transforms.Grayscale(num_output_channels=3),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


@pytest.mark.parametrize("wh", SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
@pytest.mark.parametrize("resize_mode", ["shorter_side", "squash"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("sizes", [(32, 32), (32, 37), (48, 55)], ids=lambda s: f"{s[0]}-{s[1]}")
def test_parity_with_torchvision(wh, resize_mode, interpolation, sizes):
    input_size, resize_size = sizes
    spec = ImageSpec(input_size=input_size, resize_size=resize_size, resize_mode=resize_mode,
                     interpolation=interpolation)
    img = _gray(*wh, seed=wh[0] * 7 + wh[1])
    ours = preprocess(img, spec)
    ref = _torchvision_pipeline(spec)(img).numpy()
    assert ours.shape == ref.shape == (3, input_size, input_size)
    assert float(np.abs(ours - ref).max()) <= 1e-5


@pytest.mark.parametrize("wh", SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
@pytest.mark.parametrize("resize_mode", ["shorter_side", "squash"])
def test_geometry_matches_torchvision(wh, resize_mode):
    from torchvision import transforms
    spec = ImageSpec(input_size=30, resize_size=41, resize_mode=resize_mode, interpolation="nearest")
    img = _gray(*wh, seed=1)
    size = spec.resize_size if resize_mode == "shorter_side" else (spec.resize_size, spec.resize_size)
    ref = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.NEAREST),
        transforms.CenterCrop(spec.input_size),
    ])(img)
    ours = resize_and_crop(img, spec)
    assert ours.size == ref.size == (30, 30)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
