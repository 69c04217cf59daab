"""DICOM display pipeline against values computed by hand: rescale slope/intercept, window centre/width,
VOI LUT sequence, signed and 12-bit-in-16 pixel data, MONOCHROME1 after windowing.

RG1_UNCR.dcm (the only real DICOM in the tests) has no rescale tags and a window spanning nearly its
whole range, so it cannot tell a correct display mapping from a plain min..max stretch. These files can:
their pixels do not reach both ends of the window, so a window that is ignored or re-stretched shows.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from xray.common.imageio import load_image


def dicom_bytes(stored: np.ndarray, *, bits_stored=16, signed=False, photometric="MONOCHROME2", **tags) -> bytes:
    """A minimal DX file holding `stored` (the raw stored values) in 16-bit words, plus `tags`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, by hand."""
    x = np.asarray(x, dtype=np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5)
    return np.rint(np.clip(y, 0, 1) * 255)


def decoded(data: bytes) -> np.ndarray:
    img = load_image(data, name="test.dcm")
    assert img.mode == "L"
    return np.asarray(img).astype(int)


def ramp(lo, hi, n=64):
    return np.linspace(lo, hi, n).round().reshape(8, n // 8)


def test_rescale_then_narrow_window():
    """Stored 0..4095 with slope 2, intercept -1024 -> -1024..7166; window 300 +- 200 in those units.
    The ramp runs far past both window edges, so most pixels saturate and the in-window ones are a steep ramp."""
    stored = ramp(0, 1500)  # modality values -1024..1976: below, inside and above the window
    data = dicom_bytes(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=300, WindowWidth=400)
    expected = linear_window(stored * 2 - 1024, 300, 400)
    assert (expected == 0).any() and (expected == 255).any() and ((expected > 0) & (expected < 255)).sum() >= 4
    np.testing.assert_allclose(decoded(data), expected, atol=1)


def test_window_wider_than_the_pixels_is_not_restretched():
    """All pixels inside a wide window: the window, not the image's own min..max, sets the grey levels."""
    stored = ramp(1000, 1400)
    data = dicom_bytes(stored, bits_stored=12, WindowCenter=1200, WindowWidth=2000)
    expected = linear_window(stored, 1200, 2000)  # about 102..153: a low-contrast display, as the window says
    assert expected.min() > 90 and expected.max() < 170
    np.testing.assert_allclose(decoded(data), expected, atol=1)


def test_rescale_alone_with_a_negative_slope_inverts():
    """Without a window the modality values are stretched min..max; a negative slope flips them."""
    stored = ramp(100, 3000)
    data = dicom_bytes(stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095)
    v = 4095 - stored
    expected = np.rint((v - v.min()) * 255 / (v.max() - v.min()))
    np.testing.assert_allclose(decoded(data), expected, atol=1)


def test_pydicom_reference_for_rescale_and_window():
    """The same mapping as pydicom's own apply_modality_lut + apply_voi_lut, scaled from the window's output
    range (PS3.3: 0 .. 2**BitsStored - 1, rescaled) onto 0..255."""
    stored = ramp(200, 2600)
    data = dicom_bytes(stored, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=-100,
                       WindowCenter=700, WindowWidth=900)
    ds = pydicom.dcmread(io.BytesIO(data))
    y = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    y_min, y_max = 0 * 0.5 - 100, (2 ** 12 - 1) * 0.5 - 100
    expected = np.rint((y - y_min) / (y_max - y_min) * 255)
    np.testing.assert_allclose(decoded(data), expected, atol=1)
    np.testing.assert_allclose(decoded(data), linear_window(stored * 0.5 - 100, 700, 900), atol=1)


def test_voi_lut_sequence():
    """A VOI LUT (first mapped value 1000, 256 entries, 10-bit output) used instead of a window: values
    below the first entry take the first, above the last take the last; output scaled from 0..1023."""
    stored = ramp(900, 1200)
    lut = np.rint(np.linspace(100, 700, 256)).astype(np.uint16)  # never reaches 0 or 1023
    item = Dataset()
    item.LUTDescriptor = [256, 1000, 10]
    item.add_new("LUTData", "US", lut.tolist())
    data = dicom_bytes(stored, bits_stored=12, VOILUTSequence=Sequence([item]),
                       WindowCenter=1050, WindowWidth=20)  # the LUT wins over the window
    index = np.clip(stored - 1000, 0, 255).astype(int)
    expected = np.rint(lut[index] / 1023 * 255)
    assert expected.min() > 20 and expected.max() < 180
    np.testing.assert_allclose(decoded(data), expected, atol=1)


def test_signed_12_bit_pixels_with_a_window():
    """PixelRepresentation 1, 12 bits stored in 16: -2048..2047 (sign bit 11), here -600..400 through a
    window centred on 0, width 1000."""
    values = ramp(-600, 400)
    stored = values.astype(np.int16)
    data = dicom_bytes(stored, bits_stored=12, signed=True, WindowCenter=0, WindowWidth=1000)
    np.testing.assert_allclose(decoded(data), linear_window(values, 0, 1000), atol=1)


def test_signed_12_bit_without_sign_extension_in_the_file():
    """Some writers leave bits 12-15 zero for negative 12-bit values: the sign is bit 11, not bit 15."""
    values = ramp(-300, 300)
    stored = (values.astype(np.int32) & 0x0FFF).astype(np.uint16)  # two's complement in 12 bits only
    data = dicom_bytes(stored.view(np.int16), bits_stored=12, signed=True)
    expected = np.rint((values - values.min()) * 255 / (values.max() - values.min()))
    np.testing.assert_allclose(decoded(data), expected, atol=1)


def test_12_bits_stored_in_16_ignores_the_unused_high_bits():
    """Bits above BitsStored (overlays, garbage; here on every other column) are not pixel data."""
    values = ramp(0, 4095)
    stored = values.astype(np.uint16)
    stored[:, 1::2] |= 0xF000
    data = dicom_bytes(stored, bits_stored=12)
    np.testing.assert_allclose(decoded(data), np.rint(values * 255 / 4095), atol=1)


def test_monochrome1_is_inverted_after_the_window():
    """MONOCHROME1: the windowed display is inverted (low values bright), not the raw values windowed upside down."""
    stored = ramp(0, 2000)
    data = dicom_bytes(stored, bits_stored=12, photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=1000)
    expected = 255 - linear_window(stored, 1500, 1000)
    assert (expected == 255).sum() > 10  # everything below the window is white
    np.testing.assert_allclose(decoded(data), expected, atol=1)


def test_first_of_several_windows_and_linear_exact():
    stored = ramp(0, 1000)
    several = dicom_bytes(stored, bits_stored=12, WindowCenter=[400, 900], WindowWidth=[200, 50])
    np.testing.assert_allclose(decoded(several), linear_window(stored, 400, 200), atol=1)
    exact = dicom_bytes(stored, bits_stored=12, WindowCenter=400, WindowWidth=200, VOILUTFunction="LINEAR_EXACT")
    np.testing.assert_allclose(decoded(exact), np.rint(np.clip((stored - 400) / 200 + 0.5, 0, 1) * 255), atol=1)


@pytest.mark.parametrize("width", [0, -5])
def test_invalid_window_width_is_one_clear_error(width):
    from xray.common.errors import ImageError

    data = dicom_bytes(ramp(0, 100), bits_stored=12, WindowCenter=50, WindowWidth=width)
    with pytest.raises(ImageError, match="window"):
        load_image(data, name="bad.dcm")
