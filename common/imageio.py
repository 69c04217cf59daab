"""Decode any radiograph file into the one canonical form: an 8-bit grayscale ("L") PIL image.

Handles 8/16-bit grayscale, RGB(A), palette, CMYK, EXIF orientation, TIFF, and DICOM (through
pydicom >= 3, the `[dicom]` extra). Every failure is an ImageError subclass (common.errors) with a
one-line reason and a stable `kind`, a decoder's unexpected exception included: one bad image never
sinks a batch.

Memory is bounded by design, from the header, before any pixel is decoded:
- PIL formats: width x height <= max_pixels (decompression bombs).
- DICOM: rows x columns <= max_pixels, and one frame's samples decode to <= max_decoded_bytes(max_pixels);
  only the first frame of a multi-frame instance is decoded, and a Deflated dataset is inflated only as
  far as its header and first frame (pydicom's dcmread would inflate all of it).
- Images of more than 8 bits reach 8 bits through a table over their integer range (65536 entries for
  16-bit data), looked up once per pixel: no float64 copy of the image.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadDicom, CorruptImage, EmptyImage, ImageError, NotAnImage, TooManyPixels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS

# 50 MP: the largest digital radiographs are about 4300 x 4300 (18 MP). A 30000 x 30000 PNG is refused
# from its header without being decoded.
DEFAULT_MAX_PIXELS = 50_000_000
# One DICOM frame may decode to at most max_pixels 16-bit samples (what radiographs are): e.g. 8-bit RGB
# up to 2/3 of max_pixels. Only one frame is ever decoded, so the frame count does not enter it.
DECODED_BYTES_PER_PIXEL = 2
DEFLATED_HEADER_LIMIT = 16 << 20  # bytes of a Deflated dataset inflated while looking for its pixel data
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # (Float / Double Float) Pixel Data


def max_decoded_bytes(max_pixels: int) -> int:
    """The most bytes one decoded DICOM frame may take, derived from the pixel limit."""
    return DECODED_BYTES_PER_PIXEL * max_pixels


def is_supported(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def is_dicom(path: str | Path, data: bytes | None = None) -> bool:
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return True
    head = data[:132] if data is not None else _read_head(path, 132)
    return len(head) >= 132 and head[128:132] == b"DICM"


def _read_head(path, n):
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None, name: str | None = None) -> Image.Image:
    """Decode `source` (a path or the file's bytes) into an 8-bit grayscale PIL image.

    draft_size: for JPEGs, let libjpeg decode at a reduced scale whose shorter side is still
    >= draft_size (much faster for multi-megapixel files; callers that resize afterwards use it).
    Raises an ImageError subclass (its `kind` says which) with a one-line reason for anything that is not
    a usable image, whatever the decoder raised.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else _read_bytes(source, label)
    if not data:
        raise EmptyImage(f"{label}: empty file (0 bytes)")
    dicom = is_dicom(name or (source if not isinstance(source, bytes) else ""), data)
    try:
        return _load_dicom(data, label, max_pixels) if dicom else _load_pil(data, label, max_pixels, draft_size)
    except ImageError:
        raise
    except Exception as e:  # a decoder's bug, or a file it did not foresee: this image's error, not the batch's
        error = BadDicom if dicom else CorruptImage
        raise error(f"{label}: cannot decode ({type(e).__name__}: {_reason(e)})") from e


def _read_bytes(path, label) -> bytes:
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{label}: no such file")
    if p.is_dir():
        raise ImageError(f"{label}: is a directory")
    try:
        return p.read_bytes()
    except PermissionError:
        raise ImageError(f"{label}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot read ({e.strerror or _reason(e)})") from None


def _reason(e: Exception, limit: int = 200) -> str:
    """A library's exception as one short line (pydicom's and PIL's messages may span lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_pil(data: bytes, label: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise NotAnImage(f"{label}: not a recognised image file") from None
        except Image.DecompressionBombError:
            raise TooManyPixels(f"{label}: image too large (decompression bomb)") from None
        except Exception as e:  # PIL raises many types for garbage headers
            raise NotAnImage(f"{label}: cannot decode ({_reason(e)})") from None
        w, h = img.size
        if w * h > max_pixels:
            raise TooManyPixels(f"{label}: image too large ({w}x{h} = {w * h / 1e6:.3g} MP > "
                                f"{max_pixels / 1e6:.3g} MP limit)")
        if w < 1 or h < 1:
            raise NotAnImage(f"{label}: image has no pixels")
        try:
            if draft_size and img.format == "JPEG":
                scale = min(w, h) / draft_size
                if scale >= 2:
                    img.draft(img.mode if img.mode in ("L", "RGB") else None,
                              (max(1, int(w / scale)) + 1, max(1, int(h / scale)) + 1))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the decoded image
            return to_gray8(img)
        except ImageError:
            raise
        except Exception as e:  # truncated/corrupt streams surface only on load
            raise CorruptImage(f"{label}: corrupt or truncated image ({_reason(e)})") from None


def to_gray8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grayscale. >8-bit data is stretched from its own min..max to 0..255
    (radiograph exports rarely fill the 16-bit range); alpha channels and palette transparency are
    flattened onto black (a transparency key on a gray image is ignored)."""
    mode = img.mode
    if mode == "L":
        return img
    if mode.startswith("I") or mode == "F":
        return _wide_to_gray8(img)
    if mode in ("1", "P") and "transparency" not in img.info:
        return img.convert("L")
    if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB").convert("L")
    return img.convert("L")


def stretch_to_gray8(arr: np.ndarray) -> Image.Image:
    """Linearly map an array's own min..max onto 0..255 (constant images become 0); colour is averaged."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a.mean(axis=2)
    return Image.fromarray(_stretch8(a), "L")


def _wide_to_gray8(img: Image.Image) -> Image.Image:
    """A >8-bit grey PIL image (16-bit modes, "I", "F") -> its min..max stretch, a strip of rows at a time:
    np.asarray(img) would hold two more copies of the image at once (tobytes joins chunks). Values within
    0..65535 go through a table; others through float64, one strip at a time."""
    w, h = img.size
    rows = max(1, (1 << 20) // w)
    strips = [(top, min(h, top + rows)) for top in range(0, h, rows)]

    def strip(top, bottom):
        return np.asarray(img.crop((0, top, w, bottom)))

    lo, hi = np.inf, -np.inf
    for top, bottom in strips:
        a = strip(top, bottom)
        lo, hi = min(lo, a.min()), max(hi, a.max())
    table = _stretch(np.arange(0x10000, dtype=np.float64), lo, hi) if img.mode != "F" and 0 <= lo <= hi <= 0xFFFF \
        else None
    out = np.empty((h, w), dtype=np.uint8)
    for top, bottom in strips:
        a = strip(top, bottom)
        out[top:bottom] = table[a.astype(np.uint16)] if table is not None else _stretch(a.astype(np.float64), lo, hi)
    return Image.fromarray(out, "L")


def _stretch8(a: np.ndarray) -> np.ndarray:
    """uint8 of a's min..max stretch, same shape; integers of up to 16 bits through a lookup table."""
    lo, hi = a.min(), a.max()
    if _has_table(a):
        keys, index = _table_index(a)
        return _stretch(keys.astype(np.float64), lo, hi)[index]
    return _stretch(np.asarray(a, dtype=np.float64), lo, hi)


def _stretch(x: np.ndarray, lo, hi) -> np.ndarray:
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _has_table(a: np.ndarray) -> bool:
    return a.dtype.kind in "ui" and a.dtype.itemsize <= 2


def _table_index(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every value a's dtype can hold, a as indices into them): a mapping computed once per possible value
    (65536 at most) and looked up by `table[index]` (numpy indexes with uint16 directly, no int64 copy)."""
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    return np.arange(2 ** (8 * a.dtype.itemsize), dtype=unsigned).view(a.dtype), a.view(unsigned)


# ------------------------------------------------------------------------------------------------ DICOM


def _load_dicom(data: bytes, label: str, max_pixels: int) -> Image.Image:
    _require_pydicom(label)
    from pydicom.pixels import pixel_array

    ds, deflated = _read_dicom_header(io.BytesIO(data), label)
    _check_size(ds, label, max_pixels)
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        # view_only: native pixels as a read-only view on the frame's bytes, not one more copy of them
        if deflated:
            arr = pixel_array(_first_frame(ds, *deflated, label), view_only=True)
        else:
            arr = pixel_array(io.BytesIO(data), index=0, view_only=True)  # reads and decodes the first frame only
    except ImageError:
        raise
    except Exception as e:
        raise BadDicom(f"{label}: cannot decode DICOM pixel data (transfer syntax {getattr(ts, 'name', ts)}: "
                       f"{_reason(e)})") from None
    return _dicom_to_gray8(arr, ds, label)


def _require_pydicom(label: str):
    try:
        import pydicom.pixels  # noqa: F401  (pydicom >= 3)
    except ImportError:
        raise BadDicom(f"{label}: DICOM support needs pydicom >= 3: pip install 'xray-edge[dicom]'") from None


def _read_dicom_header(fp, label: str):
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
    except ImageError:
        raise
    except Exception as e:
        raise BadDicom(f"{label}: not a readable DICOM file ({_reason(e)})") from None


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
            raise BadDicom(f"{label}: corrupt Deflated data ({_reason(e)})") from None
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
        raise BadDicom(f"{label}: corrupt Deflated data ({_reason(e)})") from None
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
        rgb = arr if arr.dtype == np.uint8 else _stretch8(arr)
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L")
    if _has_table(arr):
        keys, index = _table_index(arr)
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
        out = _stretch(np.asarray(y, dtype=np.float64), present.min(), present.max())
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
    except Exception as e:  # malformed LUT descriptors / data, a zero window width
        raise BadDicom(f"{label}: invalid VOI LUT / window ({_reason(e)})") from None
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


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only; DICOM through pydicom's header (a Deflated one inflated no
    further than its header)."""
    if is_dicom(path):
        _require_pydicom(str(path))
        with open(path, "rb") as f:
            ds = _read_dicom_header(f, str(path))[0]
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
