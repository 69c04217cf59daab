"""Any decoded image -> 8-bit grey, the one canonical form the model's preprocessing reads.

Images of more than 8 bits reach 8 bits through a table over their integer range (65536 entries for 16-bit
data), looked up once per pixel: no float64 copy of a radiograph.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_gray8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grayscale. >8-bit data is stretched from its own min..max to 0..255
    (radiograph exports rarely fill the 16-bit range); alpha channels and palette transparency are
    flattened onto black (a transparency key on a gray image is ignored)."""
    mode = img.mode
    if mode == "L":
        return img
    if mode.startswith("I") or mode == "F":
        return wide_to_gray8(img)
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
    return Image.fromarray(stretch8(a), "L")


def wide_to_gray8(img: Image.Image) -> Image.Image:
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
    table = stretch(np.arange(0x10000, dtype=np.float64), lo, hi) if img.mode != "F" and 0 <= lo <= hi <= 0xFFFF \
        else None
    out = np.empty((h, w), dtype=np.uint8)
    for top, bottom in strips:
        a = strip(top, bottom)
        out[top:bottom] = table[a.astype(np.uint16)] if table is not None else stretch(a.astype(np.float64), lo, hi)
    return Image.fromarray(out, "L")


def stretch8(a: np.ndarray) -> np.ndarray:
    """uint8 of a's min..max stretch, same shape; integers of up to 16 bits through a lookup table."""
    lo, hi = a.min(), a.max()
    if has_table(a):
        keys, index = table_index(a)
        return stretch(keys.astype(np.float64), lo, hi)[index]
    return stretch(np.asarray(a, dtype=np.float64), lo, hi)


def stretch(x: np.ndarray, lo, hi) -> np.ndarray:
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def has_table(a: np.ndarray) -> bool:
    return a.dtype.kind in "ui" and a.dtype.itemsize <= 2


def table_index(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every value a's dtype can hold, a as indices into them): a mapping computed once per possible value
    (65536 at most) and looked up by `table[index]` (numpy indexes with uint16 directly, no int64 copy)."""
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    return np.arange(2 ** (8 * a.dtype.itemsize), dtype=unsigned).view(a.dtype), a.view(unsigned)
