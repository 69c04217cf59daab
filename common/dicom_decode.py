"""DICOM -> 8-bit grey with memory bounded by design (pydicom >= 3, the `[dicom]` extra).

The header is read first and checked before any pixel is decoded: rows x columns <= max_pixels, and one
frame's samples decode to <= max_decoded_bytes(max_pixels). Only the first frame of a multi-frame instance is
decoded, and a Deflated dataset is inflated only as far as its header and first frame (pydicom's dcmread
would inflate all of it). Then the file's own display: modality LUT / rescale, VOI LUT or window (else the
min..max of the values present), MONOCHROME1 inverted, through a table over the integer range.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .errors import BadDicom, ImageError, TooManyPixels, one_line
from .gray8 import has_table, stretch, stretch8, stretch_to_gray8, table_index

# One DICOM frame may decode to at most max_pixels 16-bit samples (what radiographs are): e.g. 8-bit RGB
# up to 2/3 of max_pixels. Only one frame is ever decoded, so the frame count does not enter it.
DECODED_BYTES_PER_PIXEL = 2
DEFLATED_HEADER_LIMIT = 16 << 20  # bytes of a Deflated dataset inflated while looking for its pixel data
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # (Float / Double Float) Pixel Data


def max_decoded_bytes(max_pixels: int) -> int:
    """The most bytes one decoded DICOM frame may take, derived from the pixel limit."""
    return DECODED_BYTES_PER_PIXEL * max_pixels


def load_dicom(data: bytes, label: str, max_pixels: int) -> Image.Image:
    require_pydicom(label)
    from pydicom.pixels import pixel_array

    ds, deflated = read_dicom_header(io.BytesIO(data), label)
    _check_size(ds, label, max_pixels)
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        # view_only: native pixels as a read-only view on the frame's bytes, not one more copy of them
        if deflated:
            arr = pixel_array(_first_frame(ds, *deflated, label), view_only=True)
        else:
            arr = pixel_array(io.BytesIO(data), index=0, view_only=True)  # reads and decodes the first frame only
    except (ImageError, MemoryError):  # out of memory is the machine's state, not the image's
        raise
    except Exception as e:
        raise BadDicom(f"{label}: cannot decode DICOM pixel data (transfer syntax {getattr(ts, 'name', ts)}: "
                       f"{one_line(e)})") from None
    return _dicom_to_gray8(arr, ds, label)


def require_pydicom(label: str):
    try:
        import pydicom.pixels  # noqa: F401  (pydicom >= 3)
    except ImportError:
        raise BadDicom(f"{label}: DICOM support needs pydicom >= 3: pip install 'xray-edge[dicom]'") from None


def read_dicom_header(fp, label: str):
    """(the dataset up to its pixel data, with file_meta; for a Deflated one (inflater, offset of its pixel
    data element) else None). dcmread would inflate a Deflated dataset whole, so it is inflated here."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        read_preamble(fp, False)
        meta = FileMetaDataset(read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                            stop_when=lambda tag, vr, length: tag >> 16 != 2))
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            inflater = _Inflater(fp.read())
            ds, offset = _deflated_header(inflater, label)
            ds.file_meta = meta
            return ds, (inflater, offset)
        fp.seek(0)
        return pydicom.dcmread(fp, stop_before_pixels=True), None
    except (ImageError, MemoryError):  # out of memory is the machine's state, not the image's
        raise
    except Exception as e:
        raise BadDicom(f"{label}: not a readable DICOM file ({one_line(e)})") from None


def _check_size(ds, label: str, max_pixels: int):
    """Refuse from the header what one frame would cost: its pixels, and the bytes its samples decode to."""
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise BadDicom(f"{label}: DICOM without an image (Rows x Columns = {rows} x {cols})")
    if rows * cols > max_pixels:
        raise TooManyPixels(f"{label}: image too large ({cols}x{rows} = {rows * cols / 1e6:.3g} MP > "
                            f"{max_pixels / 1e6:.3g} MP limit)")
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 8)
    decoded, limit = rows * cols * samples * -(-bits // 8), max_decoded_bytes(max_pixels)
    if decoded > limit:
        raise TooManyPixels(f"{label}: image too large ({cols}x{rows} x {samples} samples of {bits} bits = "
                            f"{decoded / 1e6:.3g} MB decoded > {limit / 1e6:.3g} MB limit)")


class _Inflater:
    """A raw-deflated stream inflated on demand into `buf`, never past what was asked for."""

    def __init__(self, deflated: bytes):
        self.z, self.tail, self.buf = zlib.decompressobj(-zlib.MAX_WBITS), deflated, bytearray()

    def grow(self, size: int) -> bool:
        """Inflate until buf holds `size` bytes; False when the stream ends first."""
        while len(self.buf) < size:
            chunk = self.z.decompress(self.tail, size - len(self.buf))
            self.tail = self.z.unconsumed_tail
            if not chunk and not self.tail:
                return False
            self.buf += chunk
        return True


def _deflated_header(inflater: _Inflater, label: str):
    """Inflate by doubling steps until the top-level pixel data element is reached: (dataset, its offset)."""
    size = 1 << 16
    while True:
        try:
            more = inflater.grow(size)
        except zlib.error as e:
            raise BadDicom(f"{label}: corrupt Deflated data ({one_line(e)})") from None
        found = _header_before_pixels(inflater.buf)
        if found:
            return found
        if not more:
            raise BadDicom(f"{label}: no pixel data in the Deflated dataset")
        if size >= DEFLATED_HEADER_LIMIT:
            raise BadDicom(f"{label}: no pixel data within the first {DEFLATED_HEADER_LIMIT >> 20} MB of the "
                           "Deflated dataset")
        size *= 2


def _header_before_pixels(buf: bytearray):
    """(dataset, offset of the pixel data element) when `buf` holds the whole element head, else None."""
    from pydicom.filereader import read_dataset

    fp = io.BytesIO(buf)
    try:
        ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                          stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS)
    except MemoryError:
        raise
    except Exception:  # cut inside an element: more must be inflated
        return None
    offset = fp.tell()
    if len(buf) < offset + 12:
        return None
    group, element = struct.unpack_from("<HH", buf, offset)
    return (ds, offset) if (group << 16 | element) in _PIXEL_TAGS else None


def _first_frame(ds, inflater: _Inflater, offset: int, label: str):
    """The header dataset given the first frame's pixel data (and only it) from the Deflated stream, as an
    Explicit VR Little Endian dataset pydicom decodes."""
    from pydicom.pixels.utils import get_expected_length
    from pydicom.uid import ExplicitVRLittleEndian

    buf = inflater.buf
    group, element, vr, _, length = struct.unpack_from("<HH2sHI", buf, offset)  # explicit VR, 32-bit length
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = 1  # only the first frame is inflated
    need, start = get_expected_length(ds, "bytes"), offset + 12
    if length == 0xFFFFFFFF or length < need:
        raise BadDicom(f"{label}: pixel data of {length} bytes in the Deflated dataset, a frame needs {need}")
    try:
        complete = inflater.grow(start + need)
    except zlib.error as e:
        raise BadDicom(f"{label}: corrupt Deflated data ({one_line(e)})") from None
    if not complete:
        raise BadDicom(f"{label}: the Deflated dataset ends inside its pixel data")
    del buf[start + need:]
    del buf[:start]
    ds.add_new(group << 16 | element, vr.decode("ascii"), bytes(buf))
    buf.clear()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _dicom_to_gray8(arr: np.ndarray, ds, label: str) -> Image.Image:
    """One decoded frame -> 8-bit grey. Colour (RGB, YBR that pydicom turned into RGB, palette) goes to grey
    as a colour PNG does: the modality and VOI transforms are defined for grey images only (PS3.3 C.11)."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:
        if arr.shape[2] != 3:
            return stretch_to_gray8(arr)
        rgb = arr if arr.dtype == np.uint8 else stretch8(arr)
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L")
    if has_table(arr):
        keys, index = table_index(arr)
        seen = np.zeros(keys.size, dtype=bool)
        seen[index] = True
        return Image.fromarray(_grey_display(keys, ds, label, seen)[index], "L")
    return Image.fromarray(_grey_display(arr, ds, label), "L")  # 32-bit or float samples: on the image itself


def _grey_display(x: np.ndarray, ds, label: str, seen: np.ndarray | None = None) -> np.ndarray:
    """uint8 display of raw grey values x: modality LUT / rescale, then the file's VOI LUT or window, else
    the min..max of the values present (`seen` marks them when x is a table of every possible value);
    MONOCHROME1 inverted, since low values are bright there and the display convention wants them dark."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    y = apply_modality_lut(x, ds)
    present = y if seen is None else y[seen]
    if _has_voi(ds):
        out = _voi_to_gray8(y, ds, label, apply_voi_lut, seen)
    else:
        out = stretch(np.asarray(y, dtype=np.float64), present.min(), present.max())
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out
    return out


def _has_voi(ds) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _voi_to_gray8(y: np.ndarray, ds, label: str, apply_voi_lut, seen=None) -> np.ndarray:
    """The file's own display mapping onto 0..255: the VOI LUT's output range (else the window's) sets
    black and white, not the image's min..max (which would undo a window the pixels do not fill)."""
    try:
        if "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            v = np.asarray(apply_voi_lut(y, ds, prefer_lut=True), dtype=np.float64) / (2 ** bits - 1)
        else:
            v = _window(np.asarray(y, dtype=np.float64), ds)
    except MemoryError:
        raise
    except Exception as e:  # malformed LUT descriptors / data, a zero window width
        raise BadDicom(f"{label}: invalid VOI LUT / window ({one_line(e)})") from None
    finite = np.isfinite(v)
    if not (finite if seen is None else finite[seen]).all():
        raise BadDicom(f"{label}: invalid VOI LUT / window (non-finite output)")
    return np.rint(np.clip(np.where(finite, v, 0), 0, 1) * 255).astype(np.uint8)


def _first(value) -> float:
    """WindowCenter / WindowWidth may hold several windows: the first is the default display."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _window(x: np.ndarray, ds) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window (LINEAR, LINEAR_EXACT or SIGMOID) onto 0..1."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise ValueError(f"window width {width:g} with centre {center:g}")
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0, 1)
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
