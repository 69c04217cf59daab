"""Decoding that never sinks a batch, memory bounded by design (issue #19, items 3 and 4).

Typed error kinds; a decoder's unexpected exception as that image's one-line error; odd DICOMs (colour with
a VOI window, multi-frame colour, palette colour); Deflated DICOMs inflated no further than their header and
first frame; multi-frame instances decoded one frame; bombs refused from the header. Then the same files
through a real xray-serve (one bad image among good ones; the server's peak RSS per bomb, the next request
fine) and through xray-infer on a folder. The files are scripts/bench_memory.py's builders.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from bench_memory import (deflate_bomb, deflated_dicom, deflated_multiframe, dicom_bytes, png16, rle_multiframe,
                          sc_header)
from conftest import xray_infer
from PIL import Image
from serving import Server

from xray.common.errors import BadDicom, CorruptImage, EmptyImage, ImageError, NotAnImage, TooManyPixels
from xray.common.imageio import image_size, load_image
from xray.infer.predict import ImageFailure, prepare_or_error


def gray(data: bytes, name: str = "x.dcm", **kwargs) -> np.ndarray:
    img = load_image(data, name=name, **kwargs)
    assert img.mode == "L"
    return np.asarray(img)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def noise(shape, seed=0, high=256, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape, dtype=dtype)


def rgb_with_window(rgb: np.ndarray) -> bytes:
    """An RGB DICOM carrying a VOI window (PS3.3 says it applies to grey images only)."""
    return dicom_bytes(sc_header(*rgb.shape[:2], bits=8, samples=3, WindowCenter=100, WindowWidth=50), rgb.tobytes())


def multiframe_rgb(frames: np.ndarray) -> bytes:
    return dicom_bytes(sc_header(*frames.shape[1:3], bits=8, samples=3, frames=len(frames)), frames.tobytes())


def broken_palette() -> bytes:
    """PALETTE COLOR whose LUT descriptors name 1-bit entries: pydicom itself raises a TypeError on it."""
    ds = sc_header(16, 16, bits=8, photometric="PALETTE COLOR")
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", bytes(20))
    return dicom_bytes(ds, noise((16, 16)).tobytes())


def stretched(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.rint((a - a.min()) * 255 / (a.max() - a.min())).astype(np.uint8)


# ------------------------------------------------------------------------------------------ kinds


def test_every_image_error_has_a_stable_kind():
    kinds = {c: c.kind for c in (EmptyImage, TooManyPixels, CorruptImage, BadDicom, NotAnImage)}
    assert kinds == {EmptyImage: "empty", TooManyPixels: "too_many_pixels", CorruptImage: "corrupt",
                     BadDicom: "bad_dicom", NotAnImage: "not_an_image"}
    assert all(issubclass(c, ImageError) for c in kinds) and ImageError.kind == "not_an_image"


@pytest.mark.parametrize("case, error", [
    ("empty", EmptyImage), ("text", NotAnImage), ("truncated", CorruptImage), ("png_bomb", TooManyPixels),
    ("deflate_bomb", TooManyPixels), ("not_dicom", BadDicom), ("broken_palette", BadDicom),
    ("colour_too_many_bytes", TooManyPixels), ("no_rows", BadDicom)])
def test_each_failure_is_its_typed_error_and_prepare_or_error_carries_the_kind(case, error, bomb):
    good = png_bytes(noise((64, 64)))
    data, name = {
        "empty": (b"", "e.png"), "text": (b"just words\n" * 10, "t.png"), "truncated": (good[:len(good) // 2], "h.png"),
        "png_bomb": (png16(9000, 9000), "big.png"), "deflate_bomb": (bomb, "bomb.dcm"),
        "not_dicom": (b"\0" * 128 + b"DICM" + b"\xff" * 64, "junk.dcm"), "broken_palette": (broken_palette(), "p.dcm"),
        # 30 x 30 px is within a 1000 px limit, but 3 samples of 16 bits decode to 5400 bytes > 2 x 1000
        "colour_too_many_bytes": (dicom_bytes(sc_header(30, 30, bits=16, samples=3), bytes(5400)), "c.dcm"),
        "no_rows": (dicom_bytes(sc_header(0, 0), b""), "n.dcm"),
    }[case]
    max_pixels = 1000 if case == "colour_too_many_bytes" else 50_000_000
    with pytest.raises(error) as e:
        load_image(data, name=name, max_pixels=max_pixels)
    message = str(e.value)
    assert message.startswith(name + ": ") and "\n" not in message and len(message) < 300
    from xray.common.image_spec import ImageSpec

    array, failure = prepare_or_error(data, ImageSpec().with_size(64), max_pixels, name)
    assert array is None and failure == ImageFailure(error.kind, message)


def test_a_decoders_unexpected_exception_is_that_images_error(monkeypatch):
    """Inside the DICOM or the PIL path, whatever a library raises becomes the image's typed one-line error."""
    import xray.common.dicom_decode as dicom_decode
    import xray.common.gray8 as gray8

    def boom(*args, **kwargs):
        raise ZeroDivisionError("somewhere deep\nin a decoder")

    monkeypatch.setattr(dicom_decode, "_grey_display", boom)
    with pytest.raises(BadDicom, match=r"^x\.dcm: cannot decode \(ZeroDivisionError: somewhere deep in a decoder\)$"):
        gray(dicom_bytes(sc_header(8, 8), bytes(128)))
    monkeypatch.setattr(gray8, "wide_to_gray8", boom)
    with pytest.raises(CorruptImage, match=r"^x\.png: corrupt or truncated image \(somewhere deep in a decoder\)$"):
        gray(png_bytes(noise((8, 8), dtype=np.uint16, high=4000)), name="x.png")


# ------------------------------------------------------------------------------------------ odd DICOMs


def test_rgb_dicom_with_a_voi_window_is_its_grey_picture():
    """Modality and VOI transforms are for grey images: a colour DICOM becomes grey as a colour PNG does."""
    rgb = noise((12, 16, 3), seed=1)
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    np.testing.assert_array_equal(gray(rgb_with_window(rgb)), expected)
    np.testing.assert_array_equal(gray(png_bytes(rgb), name="same.png"), expected)


def test_multiframe_colour_dicom_is_its_first_frame():
    frames = noise((3, 12, 16, 3), seed=2)
    expected = np.asarray(Image.fromarray(frames[0], "RGB").convert("L"))
    np.testing.assert_array_equal(gray(multiframe_rgb(frames)), expected)


def test_palette_colour_dicom_goes_through_its_palette():
    index = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = sc_header(16, 16, bits=8, photometric="PALETTE COLOR")
    lut = ((255 - np.arange(256)) * 257).astype("<u2").tobytes()  # an inverting grey palette, 16-bit entries
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut)
    np.testing.assert_array_equal(gray(dicom_bytes(ds, index.tobytes())), 255 - index)


def test_multiframe_grey_dicoms_decode_their_first_frame():
    """Native, RLE (pydicom's own encoder) and Deflated multi-frame instances: the first frame, as its display."""
    frames = np.stack([noise((10, 12), seed=s, high=4096, dtype=np.uint16) for s in range(3)])
    expected = stretched(frames[0])
    native = dicom_bytes(sc_header(10, 12, frames=3), frames.tobytes())
    ds = sc_header(10, 12, frames=3)
    ds.PixelData = frames.tobytes()
    ds.compress(pydicom.uid.RLELossless, frames)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    deflated = deflated_dicom(sc_header(10, 12, frames=3), [frames.tobytes()], frames.nbytes)
    for data in (native, buf.getvalue(), deflated):
        np.testing.assert_array_equal(gray(data), expected)


# ------------------------------------------------------------------------------------------ Deflated


def test_deflated_dicom_decodes_as_its_explicit_vr_twin():
    """Inflated here, not by pydicom: the same display (window, MONOCHROME1) as the uncompressed file, and the
    builder's file is one pydicom reads the same pixels from."""
    stored = noise((40, 50), seed=3, high=4096, dtype=np.uint16)
    tags = {"WindowCenter": 1500, "WindowWidth": 1000, "photometric": "MONOCHROME1"}
    plain = dicom_bytes(sc_header(40, 50, **tags), stored.tobytes())
    deflated = deflated_dicom(sc_header(40, 50, **tags), [stored.tobytes()], stored.nbytes)
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(deflated)).pixel_array, stored)
    np.testing.assert_array_equal(gray(deflated), gray(plain))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return deflate_bomb()  # 12000 x 12000 x 16 bits: 288 MB inflated, 0.28 MB on disk


def test_deflate_bomb_is_refused_from_its_header(bomb, tmp_path):
    assert len(bomb) < 400_000
    t0 = time.perf_counter()
    with pytest.raises(TooManyPixels, match=r"12000x12000 = 144 MP > 50 MP limit"):
        load_image(bomb, name="bomb.dcm")
    assert time.perf_counter() - t0 < 0.5  # inflating 288 MB alone takes longer
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    assert image_size(path) == (12000, 12000)


def test_broken_deflated_streams_are_bad_dicom():
    stored = noise((64, 64), seed=4, high=4096, dtype=np.uint16)
    good = deflated_dicom(sc_header(64, 64), [stored.tobytes()], stored.nbytes)
    start = 144 + int.from_bytes(good[140:144], "little")
    cut = good[:start + (len(good) - start) // 2]  # ends inside its pixel data
    garbage = good[:start] + b"\xff" * 200
    empty_pixels = deflated_dicom(sc_header(64, 64), [], 0)
    header_only = sc_header(64, 64, transfer_syntax=pydicom.uid.DeflatedExplicitVRLittleEndian)
    buf = io.BytesIO()
    header_only.save_as(buf, enforce_file_format=True)
    for data, reason in ((cut, "ends inside its pixel data"), (garbage, "corrupt Deflated data"),
                         (empty_pixels, "pixel data of 0 bytes in the Deflated dataset, a frame needs 8192"),
                         (buf.getvalue(), "no pixel data in the Deflated dataset")):
        with pytest.raises(BadDicom, match=reason):
            load_image(data, name="d.dcm")


# ------------------------------------------------------------------------------------------ xray-serve


def vm(pid: int, key: str) -> float:
    """VmHWM / VmRSS of a process in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith(key + ":")) / 1024


@pytest.fixture(scope="module")
def server(tiny_onnx):
    with Server("--model", tiny_onnx[0]) as s:  # the default limits
        yield s


@pytest.mark.slow
def test_odd_dicoms_next_to_a_good_png_are_answered_one_by_one(server):
    files = [("rgb_window.dcm", rgb_with_window(noise((300, 400, 3), seed=5))),
             ("frames_rgb.dcm", multiframe_rgb(noise((4, 300, 400, 3), seed=6))),
             ("palette.dcm", broken_palette()), ("good.png", png_bytes(noise((300, 400), seed=7)))]
    r = requests.post(server.url + "/v1/predict", files=[("file", f) for f in files], timeout=60)
    assert r.status_code == 200, r.text
    preds = {p["file"]: p for p in r.json()["predictions"]}
    assert all(preds[n]["prediction"] for n in ("rgb_window.dcm", "frames_rgb.dcm", "good.png")), preds
    error = preds["palette.dcm"]["error"]
    assert error["kind"] == "bad_dicom" and error["message"].startswith("palette.dcm: cannot decode (TypeError")
    assert "\n" not in error["message"]
    assert server.metrics()['xray_errors_total{kind="bad_dicom"}'] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deflate_bomb", "deflated_multiframe", "rle_multiframe"])
def test_bombs_are_refused_or_answered_in_bounded_memory_and_the_next_request_is_fine(server, kind, bomb):
    """Each decodes to 288-480 MB if decoded whole; the server's peak RSS rises far less."""
    data, status, answer = {"deflate_bomb": (bomb, 422, "too_many_pixels"),
                            "deflated_multiframe": (deflated_multiframe(), 200, None),  # 2000 x 2000 x 60, 0.47 MB
                            "rle_multiframe": (rle_multiframe(), 200, None)}[kind]  # 2000 x 2000 x 60, 7.7 MB
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = vm(pid, "VmRSS")
    r = requests.post(server.url + "/v1/predict", data=data, timeout=120,
                      headers={"Content-Type": "application/dicom", "X-Filename": f"{kind}.dcm"})
    rise = vm(pid, "VmHWM") - before
    assert r.status_code == status, r.text
    pred = r.json()["predictions"][0]
    assert (pred["error"]["kind"] == answer) if answer else pred["prediction"], pred
    assert rise < 400, f"{kind}: peak RSS rose {rise:.0f} MB"
    r = requests.post(server.url + "/v1/predict", files=[("file", ("next.png", png_bytes(noise((256, 256)))))],
                      timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["prediction"]


# ------------------------------------------------------------------------------------------ xray-infer


def test_xray_infer_on_a_folder_answers_every_file_it_can(tiny_onnx, bomb, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    files = {"rgb_window.dcm": rgb_with_window(noise((300, 400, 3), seed=5)),
             "frames_rgb.dcm": multiframe_rgb(noise((4, 300, 400, 3), seed=6)),
             "palette.dcm": broken_palette(), "bomb.dcm": bomb, "good.png": png_bytes(noise((300, 400), seed=7))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    proc = xray_infer("--model", tiny_onnx[0], folder, "-f", "json", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # 1: some inputs failed
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert len(errors) == 2, proc.stderr
    assert errors[0] == f"error: {folder / 'bomb.dcm'}: image too large (12000x12000 = 144 MP > 50 MP limit)"
    assert errors[1].startswith(f"error: {folder / 'palette.dcm'}: cannot decode (TypeError: ")
    doc = json.loads(proc.stdout)
    assert sorted(Path(p["file"]).name for p in doc["predictions"]) == ["frames_rgb.dcm", "good.png", "rgb_window.dcm"]
