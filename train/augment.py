"""Train-only augmentation on the grayscale PIL image, before the one `common` preprocessing.

Parameters are drawn from an explicit numpy Generator (seeded per epoch and sample by the dataset),
not from global RNG state, so a run resumed mid-epoch sees exactly the augmentations it would have
seen uninterrupted, whatever the number of loader workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from xray.common.image_spec import ImageSpec

_INTERP = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
           "bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS}


@dataclass(frozen=True)
class AugmentConfig:
    """Conservative for radiographs: crops keep most of the thorax; no flip (anatomy is not symmetric)."""

    crop_scale: tuple[float, float] = (0.75, 1.0)
    crop_ratio: tuple[float, float] = (0.85, 1.18)
    degrees: float = 7.0
    translate: float = 0.04
    scale: tuple[float, float] = (0.95, 1.05)
    brightness: float = 0.2
    contrast: float = 0.2
    hflip: bool = False


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator, scale, ratio):
    """torchvision's RandomResizedCrop.get_params with an explicit generator."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(w, h)  # fallback: central square
    return (h - side) // 2, (w - side) // 2, side, side


def augment(img: Image.Image, spec: ImageSpec, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Random resized crop to resize_size, small affine, brightness/contrast, optional flip."""
    interp = _INTERP[spec.interpolation]
    top, left, ch, cw = random_resized_crop_box(img.width, img.height, rng, cfg.crop_scale, cfg.crop_ratio)
    size = spec.resize_size
    img = TF.resized_crop(img, top, left, ch, cw, [size, size], interpolation=interp, antialias=True)
    if cfg.degrees or cfg.translate or cfg.scale != (1.0, 1.0):
        angle = float(rng.uniform(-cfg.degrees, cfg.degrees))
        shift = [int(round(rng.uniform(-cfg.translate, cfg.translate) * size)) for _ in range(2)]
        img = TF.affine(img, angle=angle, translate=shift, scale=float(rng.uniform(*cfg.scale)), shear=[0.0],
                        interpolation=InterpolationMode.BILINEAR, fill=0)
    if cfg.brightness:
        img = TF.adjust_brightness(img, float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)))
    if cfg.contrast:
        img = TF.adjust_contrast(img, float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)))
    if cfg.hflip and rng.random() < 0.5:
        img = TF.hflip(img)
    return img
