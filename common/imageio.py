"""Decode any radiograph file into the one canonical form: an 8-bit grayscale ("L") PIL image.

Handles 8/16-bit grayscale, RGB(A), palette, CMYK, EXIF orientation, TIFF, and DICOM (through
pydicom >= 3, the `[dicom]` extra). Every failure is an ImageError subclass (common.errors) with a
one-line reason and a stable `kind`, a decoder's unexpected exception included: one bad image never
sinks a batch.

Memory is bounded by design, from the header, before any pixel is decoded: width x height <= max_pixels
(decompression bombs); DICOM's own limits are in common.dicom_decode, the 8-bit conversion in common.gray8.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom_decode import load_dicom, read_dicom_header, require_pydicom
from .errors import BadDicom, CorruptImage, EmptyImage, ImageError, NotAnImage, TooManyPixels, one_line
from .gray8 import to_gray8

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
    Raises an ImageError subclass (its `kind` says which) with a one-line reason for anything that is not
    a usable image, whatever the decoder raised.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else _read_bytes(source, label)
    if not data:
        raise EmptyImage(f"{label}: empty file (0 bytes)")
    dicom = is_dicom(name or (source if not isinstance(source, bytes) else ""), data)
    try:
        return load_dicom(data, label, max_pixels) if dicom else _load_pil(data, label, max_pixels, draft_size)
    except (ImageError, MemoryError):  # out of memory is the machine's state, not the image's
        raise
    except Exception as e:  # a decoder's bug, or a file it did not foresee: this image's error, not the batch's
        error = BadDicom if dicom else CorruptImage
        raise error(f"{label}: cannot decode ({type(e).__name__}: {one_line(e)})") from e


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
        raise ImageError(f"{label}: cannot read ({e.strerror or one_line(e)})") from None


def _load_pil(data: bytes, label: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise NotAnImage(f"{label}: not a recognised image file") from None
        except Image.DecompressionBombError:
            raise TooManyPixels(f"{label}: image too large (decompression bomb)") from None
        except MemoryError:
            raise
        except Exception as e:  # PIL raises many types for garbage headers
            raise NotAnImage(f"{label}: cannot decode ({one_line(e)})") from None
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
        except (ImageError, MemoryError):  # out of memory is the machine's state, not the image's
            raise
        except Exception as e:  # truncated/corrupt streams surface only on load
            raise CorruptImage(f"{label}: corrupt or truncated image ({one_line(e)})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only; DICOM through pydicom's header (a Deflated one inflated no
    further than its header)."""
    if is_dicom(path):
        require_pydicom(str(path))
        with open(path, "rb") as f:
            ds = read_dicom_header(f, str(path))[0]
        return int(ds.Columns), int(ds.Rows)
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
