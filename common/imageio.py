"""Decode any radiograph file into the one canonical form: an 8-bit grayscale ("L") PIL image.

Handles 8/16-bit grayscale, RGB(A), palette, CMYK, EXIF orientation, TIFF, and DICOM (through
pydicom, the `[dicom]` extra). Refuses decompression bombs from the header, before decoding.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS

# 50 MP: the largest digital radiographs are about 4300 x 4300 (18 MP). A 30000 x 30000 PNG is refused
# from its header without being decoded.
DEFAULT_MAX_PIXELS = 50_000_000


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
    Raises ImageError with a one-line reason for anything that is not a usable image.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else _read_bytes(source, label)
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    if is_dicom(name or (source if not isinstance(source, bytes) else ""), data):
        return _load_dicom(data, label, max_pixels)
    return _load_pil(data, label, max_pixels, draft_size)


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
            raise ImageError(f"{label}: not a recognised image file") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: image too large (decompression bomb)") from None
        except Exception as e:  # PIL raises many types for garbage headers
            raise ImageError(f"{label}: cannot decode ({_reason(e)})") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(f"{label}: image too large ({w}x{h} = {w * h / 1e6:.3g} MP > "
                             f"{max_pixels / 1e6:.3g} MP limit)")
        if w < 1 or h < 1:
            raise ImageError(f"{label}: image has no pixels")
        try:
            if draft_size and img.format == "JPEG":
                scale = min(w, h) / draft_size
                if scale >= 2:
                    img.draft(img.mode if img.mode in ("L", "RGB") else None,
                              (max(1, int(w / scale)) + 1, max(1, int(h / scale)) + 1))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_gray8(img)
        except ImageError:
            raise
        except Exception as e:  # truncated/corrupt streams surface only on load
            raise ImageError(f"{label}: corrupt or truncated image ({_reason(e)})") from None


def to_gray8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grayscale. >8-bit data is stretched from its own min..max to 0..255
    (radiograph exports rarely fill the 16-bit range); alpha channels and palette transparency are
    flattened onto black (a transparency key on a gray image is ignored)."""
    mode = img.mode
    if mode == "L":
        return img
    if mode.startswith("I") or mode == "F":
        return stretch_to_gray8(np.asarray(img))
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
    """Linearly map an array's own min..max onto 0..255 (constant images become 0)."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=2)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return Image.fromarray(np.zeros(a.shape, dtype=np.uint8), "L")
    out = np.rint((a - lo) * (255.0 / (hi - lo)))
    return Image.fromarray(out.astype(np.uint8), "L")


def _load_dicom(data: bytes, label: str, max_pixels: int) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        try:
            import pydicom
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
        except ImportError:
            raise ImageError(f"{label}: DICOM support needs pydicom: pip install 'xray-edge[dicom]'") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:
        raise ImageError(f"{label}: not a readable DICOM file ({_reason(e)})") from None
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if rows * cols > max_pixels:
        raise ImageError(f"{label}: image too large ({cols}x{rows})")
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", ts)
        raise ImageError(f"{label}: cannot decode DICOM pixel data (transfer syntax {ts_name}: {_reason(e)})") from None
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]  # multi-frame: the first frame
    arr = apply_modality_lut(arr, ds)
    img = _voi_to_gray8(arr, ds, label, apply_voi_lut) if _has_voi(ds) else stretch_to_gray8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        img = ImageOps.invert(img)  # MONOCHROME1: low values are bright; display convention wants them dark
    return img


def _has_voi(ds) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _voi_to_gray8(arr: np.ndarray, ds, label: str, apply_voi_lut) -> Image.Image:
    """The file's own display mapping onto 0..255: the VOI LUT's output range (else the window's) sets
    black and white, not the image's min..max (which would undo a window the pixels do not fill)."""
    try:
        if "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            y = np.asarray(apply_voi_lut(arr, ds, prefer_lut=True), dtype=np.float64) / (2 ** bits - 1)
        else:
            y = _window(np.asarray(arr, dtype=np.float64), ds)
    except Exception as e:  # malformed LUT descriptors / data, a zero window width
        raise ImageError(f"{label}: invalid VOI LUT / window ({_reason(e)})") from None
    if not np.isfinite(y).all():
        raise ImageError(f"{label}: invalid VOI LUT / window (non-finite output)")
    return Image.fromarray(np.rint(np.clip(y, 0, 1) * 255).astype(np.uint8), "L")


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
    """(width, height) from the header only; DICOM through pydicom's header."""
    if is_dicom(path):
        import pydicom

        ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
