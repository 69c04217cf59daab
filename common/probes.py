"""Out-of-distribution probe sets: offline, seeded, reproducible pictures the guard must call "not like
the training data". Every probe is an 8-bit grayscale PIL image, the form `load_image` gives.

Three groups of families:
  transformed   chest images made unusable: inverted, rotated 90 degrees, heavy blur, a corner crop,
                a tiny downscale (blown up again by preprocessing)
  generated     non-radiographs: uniform noise, flat grey, gradients, checkerboards, rendered text
  photographs   real pictures bundled with scikit-image (a dev/test dependency; skipped when absent):
                natural photos, and other medical images (retina fundus, microscopy, a CT phantom)
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from .gray8 import to_gray8

TRANSFORMED = ("inverted", "rotated_90", "heavy_blur", "corner_crop", "tiny_downscale")
GENERATED = ("noise", "flat_grey", "gradient", "checkerboard", "text")
PHOTOS = {
    "photographs": ("astronaut", "camera", "coffee", "chelsea", "rocket", "moon", "coins", "clock", "grass",
                    "gravel", "brick", "hubble_deep_field", "colorwheel", "page"),
    "other_medical": ("retina", "microaneurysms", "immunohistochemistry", "cell", "shepp_logan_phantom"),
}
GROUP = {**{f: "transformed" for f in TRANSFORMED}, **{f: "generated" for f in GENERATED},
         **{f: "photographs" for f in PHOTOS}}


def transform(img: Image.Image, family: str) -> Image.Image:
    w, h = img.size
    if family == "inverted":
        return ImageOps.invert(img)
    if family == "rotated_90":
        return img.transpose(Image.Transpose.ROTATE_90)
    if family == "heavy_blur":
        return img.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(w, h) / 12)))
    if family == "corner_crop":
        return img.crop((0, 0, max(1, w // 3), max(1, h // 3)))
    if family == "tiny_downscale":
        return img.resize((max(1, w // 24), max(1, h // 24)), Image.Resampling.BILINEAR)
    raise ValueError(f"unknown transform {family!r}")


def generate(family: str, rng: np.random.Generator, size: int = 256) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    if family == "noise":
        arr = rng.integers(0, 256, (size, size))
    elif family == "flat_grey":
        arr = np.full((size, size), rng.integers(20, 236))
    elif family == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        g = np.cos(a) * xx + np.sin(a) * yy
        arr = 255 * (g - g.min()) / (np.ptp(g) or 1)
    elif family == "checkerboard":
        cell = int(rng.integers(8, 65))
        arr = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2) * 255
    elif family == "text":
        img = Image.new("L", (size, size), int(rng.integers(200, 256)))
        draw, font = ImageDraw.Draw(img), ImageFont.load_default()
        words = ("patient", "report", "chest", "film", "normal", "clinic", "date", "result", "ward", "see")
        for row in range(4, size - 12, 14):
            line = " ".join(words[i] for i in rng.integers(0, len(words), 6))
            draw.text((4, row), line, fill=int(rng.integers(0, 60)), font=font)
        return img
    else:
        raise ValueError(f"unknown generated probe {family!r}")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def photographs(names) -> list[Image.Image]:
    """scikit-image's bundled sample images, as grayscale; [] when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in names:
        arr = np.asarray(getattr(data, name)())
        if arr.dtype != np.uint8:  # the phantom is float in [0, 1]
            arr = (255 * (arr - arr.min()) / (np.ptp(arr) or 1)).astype(np.uint8)
        out.append(to_gray8(Image.fromarray(arr)))
    return out


def probe_sets(chest: list[Image.Image], per_family: int = 12, seed: int = 0) -> dict[str, list[Image.Image]]:
    """family -> probe images: the transforms of up to `per_family` of the given chest images, `per_family`
    images of each generated family, and the bundled photographs."""
    rng = np.random.default_rng(seed)
    out = {f: [transform(im, f) for im in chest[:per_family]] for f in TRANSFORMED}
    out |= {f: [generate(f, rng) for _ in range(per_family)] for f in GENERATED}
    for family, names in PHOTOS.items():
        if images := photographs(names):
            out[family] = images
    return {f: images for f, images in out.items() if images}
