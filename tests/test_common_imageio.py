"""xray.common.imageio: every supported input becomes an 8-bit 'L' image; bad inputs raise ImageError."""
from __future__ import annotations

import io
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray.common.errors import ImageError, XrayError
from xray.common.imageio import image_size, is_dicom, load_image


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


def _ramp(h, w):
    """A smooth 8-bit image spanning exactly 0..255 (compresses well, survives JPEG)."""
    x = np.linspace(0, 255, w)[None, :]
    y = np.linspace(0, 255, h)[:, None]
    return np.rint((x + y) / 2).astype(np.uint8)


def _assert_gray8(img):
    assert isinstance(img, Image.Image)
    assert img.mode == "L"
    assert np.asarray(img).dtype == np.uint8


def _assert_image_error(excinfo, *fragments):
    err = excinfo.value
    assert isinstance(err, XrayError)
    msg = str(err)
    assert msg and "\n" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


# ----------------------------------------------------------------------------------------- formats


def test_gray_png_is_returned_exactly(tmp_path):
    arr = _noise(37, 53)
    p = tmp_path / "g.png"
    Image.fromarray(arr, "L").save(p)
    img = load_image(p)
    _assert_gray8(img)
    assert img.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_gray_jpeg_matches_pil_decode(tmp_path):
    p = tmp_path / "g.jpg"
    Image.fromarray(_ramp(64, 80), "L").save(p, quality=90)
    img = load_image(str(p))  # str paths too
    _assert_gray8(img)
    assert img.size == (80, 64)
    with Image.open(p) as ref:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))


def test_16bit_png_is_stretched_min_max(tmp_path):
    arr8 = _noise(40, 30, seed=3)
    arr8[0, 0], arr8[0, 1] = 0, 255  # spans 0..255
    arr16 = arr8.astype(np.uint16) * 257  # spans 0..65535
    p = tmp_path / "g16.png"
    Image.fromarray(arr16).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")  # really a >8-bit file
    img = load_image(p)
    _assert_gray8(img)
    np.testing.assert_array_equal(np.asarray(img), arr8)


def test_16bit_png_narrow_range_is_stretched_to_full_range(tmp_path):
    arr16 = np.full((10, 10), 1000, dtype=np.uint16)
    arr16[:, 5:] = 3000
    p = tmp_path / "narrow16.png"
    Image.fromarray(arr16).save(p)
    out = np.asarray(load_image(p))
    assert (out[:, :5] == 0).all() and (out[:, 5:] == 255).all()


@pytest.mark.parametrize("dtype, offset", [("<u2", 0), (">u2", 0), ("<i4", 0), ("<i4", -70000), ("<f4", 0)])
def test_wide_tiffs_are_stretched_exactly_as_in_float(tmp_path, dtype, offset):
    """16-bit (both byte orders), 32-bit integer and float TIFFs: the table / strip paths give exactly the
    float64 min..max stretch, whether the values fit in 16 bits or not."""
    rng = np.random.default_rng(11)
    arr = (rng.integers(300, 60000, size=(1100, 1000)) + offset).astype(dtype)  # > one strip of rows
    p = tmp_path / "w.tif"
    Image.fromarray(arr).save(p)
    a = arr.astype(np.float64)
    expected = np.rint((a - a.min()) * (255.0 / (a.max() - a.min()))).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(p)), expected)


def test_rgb_png(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    p = tmp_path / "c.png"
    Image.fromarray(rgb, "RGB").save(p)
    img = load_image(p)
    _assert_gray8(img)
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_rgba_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere
    rgba[:, :10, 3] = 0  # left half fully transparent
    rgba[:, 10:, 3] = 255  # right half opaque
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = np.asarray(load_image(p))
    assert out.shape == (20, 20)
    assert (out[:, :10] == 0).all()
    assert (out[:, 10:] == 255).all()


def test_palette_without_transparency(tmp_path):
    pal_img = Image.fromarray(_ramp(16, 16), "L").convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p = tmp_path / "p.png"
    pal_img.save(p)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" not in check.info
        expected = np.asarray(check.convert("L"))
    img = load_image(p)
    _assert_gray8(img)
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_palette_with_transparency_flattened_to_black(tmp_path):
    idx = np.zeros((10, 10), dtype=np.uint8)
    idx[:, 5:] = 1
    pal_img = Image.fromarray(idx, "P")
    pal_img.putpalette([255, 255, 255, 128, 128, 128] + [0] * (254 * 3))  # index 0 white, 1 gray
    p = tmp_path / "pt.png"
    pal_img.save(p, transparency=0)  # the white index is transparent
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = np.asarray(load_image(p))
    assert (out[:, :5] == 0).all()  # transparent white -> black, not 255
    assert (out[:, 5:] == 128).all()


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((32, 32, 4), dtype=np.uint8)
    cmyk[:, 16:, 3] = 255  # right half full black ink, left half no ink (white)
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(p, quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    img = load_image(p)
    _assert_gray8(img)
    out = np.asarray(img).astype(int)
    assert out[:, 2:12].min() > 230  # no ink -> white
    assert out[:, 20:30].max() < 25  # black ink -> black


def test_tiff(tmp_path):
    arr = _noise(25, 35, seed=5)
    p = tmp_path / "t.tif"
    Image.fromarray(arr, "L").save(p)
    img = load_image(p)
    _assert_gray8(img)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_bytes_input_equals_path_input(tmp_path):
    p = tmp_path / "b.png"
    Image.fromarray(_noise(12, 14), "L").save(p)
    from_bytes = load_image(p.read_bytes())
    _assert_gray8(from_bytes)
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(load_image(p)))


def test_exif_orientation_6_is_applied(tmp_path):
    arr = np.zeros((40, 60), dtype=np.uint8)  # 60 wide x 40 high
    arr[:, 30:] = 255  # left half black, right half white
    img = Image.fromarray(arr, "L")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == (40, 60)  # transposed
    a = np.asarray(out).astype(int)
    # 90 degrees clockwise: the original left (black) column ends up on top
    assert a[:25].mean() < 30 and a[35:].mean() > 225
    assert image_size(p) == (40, 60)


def test_image_size_plain(tmp_path):
    p = tmp_path / "s.png"
    Image.fromarray(_noise(21, 34), "L").save(p)
    assert image_size(p) == (34, 21)


def test_draft_size_on_large_jpeg(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(_ramp(1536, 2048), "L").save(p, quality=85)
    full = load_image(p)
    assert full.size == (2048, 1536)
    small = load_image(p, draft_size=300)
    _assert_gray8(small)
    assert min(small.size) >= 300
    assert small.size[0] < 2048 and small.size[1] < 1536
    # aspect kept
    assert abs(small.size[0] / small.size[1] - 2048 / 1536) < 0.02


def test_draft_size_ignored_for_png(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(_ramp(600, 800), "L").save(p)
    assert load_image(p, draft_size=100).size == (800, 600)


# ------------------------------------------------------------------------------------------ errors


def test_image_error_is_xray_error():
    assert issubclass(ImageError, XrayError)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(ImageError) as ei:
        load_image(p)
    _assert_image_error(ei, "nope.png", "no such file")


def test_directory(tmp_path):
    d = tmp_path / "adir.png"
    d.mkdir()
    with pytest.raises(ImageError) as ei:
        load_image(d)
    _assert_image_error(ei, "directory")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError) as ei:
        load_image(p)
    _assert_image_error(ei, "empty.jpg", "empty")


def test_empty_bytes():
    with pytest.raises(ImageError) as ei:
        load_image(b"")
    _assert_image_error(ei, "empty")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_noise(512, 512, seed=7), "L").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    assert len(data) > 20000
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[:2000])
    with pytest.raises(ImageError) as ei:
        load_image(p)
    _assert_image_error(ei, "trunc.jpg")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageError) as ei:
        load_image(p)
    _assert_image_error(ei, "notes.png", "not a recognised image")


def _png_1bit(path: Path, w: int, h: int) -> None:
    """A valid all-black 1-bit PNG written row by row, without holding the pixels in memory."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)  # filter byte + packed bits
    idat = b"".join([comp.compress(row) for _ in range(h)] + [comp.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_refused_fast(tmp_path):
    p = tmp_path / "bomb.png"
    _png_1bit(p, 30000, 30000)
    assert p.stat().st_size < 1_000_000  # tiny file, 900 MP
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as ei:
        load_image(p)
    elapsed = time.perf_counter() - t0
    _assert_image_error(ei, "bomb.png", "too large")
    assert elapsed < 2.0, f"refusal took {elapsed:.2f}s: the image was decoded"


def test_image_above_default_limit_but_below_pil_bomb_limit(tmp_path):
    p = tmp_path / "big.png"
    _png_1bit(p, 8000, 8000)  # 64 MP > 50 MP default, < PIL's own error threshold
    with pytest.raises(ImageError) as ei:
        load_image(p)
    _assert_image_error(ei, "too large")


def test_custom_max_pixels(tmp_path):
    p = tmp_path / "m.png"
    Image.fromarray(_noise(100, 100), "L").save(p)
    with pytest.raises(ImageError) as ei:
        load_image(p, max_pixels=5000)
    _assert_image_error(ei, "too large")
    assert load_image(p, max_pixels=10_000).size == (100, 100)  # the limit itself is allowed


def test_name_is_used_in_messages_for_bytes():
    with pytest.raises(ImageError) as ei:
        load_image(b"garbage bytes, not an image", name="upload-17.png")
    _assert_image_error(ei, "upload-17.png")


# ------------------------------------------------------------------------------------------- DICOM


def _find_rg1() -> Path | None:
    """RG1_UNCR.dcm from the installed pydicom-data package, found on disk (never downloaded): the lookup of
    scripts/screenshot_page.py (scripts are on sys.path through conftest), kept in one place."""
    from screenshot_page import find_rg1

    return find_rg1()


@pytest.fixture(scope="module")
def rg1() -> Path:
    """pydicom and pydicom-data are dev dependencies: missing, they fail these tests (never skip them)."""
    import pydicom  # noqa: F401

    path = _find_rg1()
    assert path is not None, "RG1_UNCR.dcm not found: install the dev extra (pydicom-data)"
    return path


def test_dicom_monochrome1_loads(rg1):
    import pydicom

    ds = pydicom.dcmread(rg1, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = load_image(rg1)
    _assert_gray8(img)
    assert img.size == (int(ds.Columns), int(ds.Rows))
    assert image_size(rg1) == (int(ds.Columns), int(ds.Rows))
    a = np.asarray(img).astype(np.float64)
    assert a.std() > 10  # not constant
    h, w = a.shape
    air = a[int(0.02 * h):int(0.08 * h), : int(0.05 * w)].mean()  # top-left corner outside the body
    mediastinum = a[int(0.4 * h):int(0.6 * h), int(0.45 * w):int(0.55 * w)].mean()
    # display convention after the MONOCHROME1 inversion: air dark, mediastinum/spine bright
    assert air < 100 < 180 < mediastinum


def test_dicom_monochrome2_is_the_inverse(rg1, tmp_path):
    import pydicom

    ds = pydicom.dcmread(rg1)
    ds.PhotometricInterpretation = "MONOCHROME2"
    p2 = tmp_path / "mono2.dcm"
    ds.save_as(p2)
    a = np.asarray(load_image(rg1)).astype(int)
    b = np.asarray(load_image(p2)).astype(int)
    assert a.shape == b.shape
    assert np.mean(a + b == 255) > 0.999


def test_is_dicom_by_magic(rg1, tmp_path):
    renamed = tmp_path / "scan.bin"
    shutil.copyfile(rg1, renamed)
    assert is_dicom(rg1)
    assert is_dicom(renamed)
    assert is_dicom("whatever.bin", data=renamed.read_bytes())
    png = tmp_path / "x.png"
    Image.fromarray(_noise(8, 8), "L").save(png)
    assert not is_dicom(png)
    assert not is_dicom(tmp_path / "missing.bin")
    np.testing.assert_array_equal(np.asarray(load_image(renamed)), np.asarray(load_image(rg1)))
    # bytes input is recognised by its magic as well
    np.testing.assert_array_equal(np.asarray(load_image(renamed.read_bytes())), np.asarray(load_image(rg1)))
    assert image_size(renamed) == load_image(rg1).size


def test_dicom_max_pixels(rg1):
    with pytest.raises(ImageError) as ei:
        load_image(rg1, max_pixels=1000)
    _assert_image_error(ei, "too large")


def test_library_errors_become_one_short_line():
    from xray.common.errors import one_line as _reason

    assert _reason(ValueError("plugins failed:\n  pillow: bad marker\n  other: nope")) == \
        "plugins failed: pillow: bad marker other: nope"
    assert len(_reason(ValueError("x" * 1000))) == 200 and _reason(ValueError()) == "ValueError"
