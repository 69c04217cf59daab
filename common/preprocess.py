"""The ONE preprocessing function: grayscale PIL image + ImageSpec -> normalised float32 CHW array.

Training (eval transform), export (calibration, verification) and xray-infer all call this; augmentation
is train-only and happens on the PIL image before it. Geometry matches torchvision's
Resize(int) + CenterCrop so results are comparable with torchvision references.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .image_spec import ImageSpec

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def pil_filter(name: str) -> Image.Resampling:
    return _PIL_FILTERS[name]


def resize_and_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Geometry only: resize per spec.resize_mode, then center-crop to input_size x input_size."""
    w, h = img.size
    if spec.resize_mode == "squash":
        new_w = new_h = spec.resize_size
    else:  # shorter_side, same rounding as torchvision.transforms.functional.resize
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), pil_filter(spec.interpolation))
    size = spec.input_size
    if (new_w, new_h) != (size, size):
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def preprocess(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """8-bit grayscale PIL image -> float32 array of shape (channels, input_size, input_size)."""
    if img.mode != "L":
        raise ValueError(f"preprocess expects an 8-bit grayscale ('L') image, got mode {img.mode!r}")
    arr = np.asarray(resize_and_crop(img, spec), dtype=np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = (arr[None, :, :] - mean) / std  # broadcasting replicates gray into every channel
    return np.ascontiguousarray(out, dtype=np.float32)


def preprocess_batch(images, spec: ImageSpec) -> np.ndarray:
    """A list of grayscale PIL images -> float32 NCHW batch."""
    return np.stack([preprocess(im, spec) for im in images])
