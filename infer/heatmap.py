"""--heatmap: the original image with the predicted class's activation map over it, as a PNG (numpy + PIL).

The map (h x w, e.g. 7 x 7 at 224 px) covers the model's input, which is the whole image for the
"squash" resize rule and the centre crop otherwise; it is drawn over that region of the original.

Colour is on one scale per model: cam / scale, clipped to [0, 1], with `scale` the model's `xray.cam_scale`
(the model's typical strongest evidence on the val split: per predicted class the 99th percentile of its
map, the median over classes; export/cam_scale.py), so every class and every image is drawn in the same units
and a weak class stays faint. A model exported before that key has no
scale (None): each map is divided by its own maximum (red = this image's strongest spot, however weak), and
the tools say so (SCALE_NOTE_PER_IMAGE, `legend`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xray.common.artifacts import atomic_path
from xray.common.image_spec import ImageSpec

ALPHA = 0.45  # weight of the colour map where the model looked hardest
SCALE_NOTE_PER_IMAGE = "heatmaps scaled per image: model exported before xray.cam_scale"
LEGEND_MODEL = ("Colour = the class's activation relative to this model's typical strongest evidence (99th "
                "percentile on validation images, median over classes): clear is none, blue weak, red at or above "
                "it; every class is on the same scale, so a weak class stays faint.")
LEGEND_PER_IMAGE = ("Colour is scaled per image: red marks this image's strongest activation for the class, however "
                    "weak, so a class at 1 % can look as hot as the prediction (the model was exported before "
                    "xray.cam_scale); compare classes by probability, not colour.")


def legend(scale: float | None) -> dict:
    """What the colours mean, for a viewer to draw (xray-serve's /v1/metadata `heatmap`)."""
    if scale is None:
        return {"scale": "per_image", "value": None, "legend": LEGEND_PER_IMAGE}
    return {"scale": "model", "value": float(scale), "legend": LEGEND_MODEL}


def jet(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, the classic blue-cyan-yellow-red ramp."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def input_region(size: tuple[int, int], spec: ImageSpec) -> tuple[int, int, int, int]:
    """The box of the original image (w, h) that preprocessing turns into the model's input."""
    w, h = size
    if spec.resize_mode == "squash":
        return 0, 0, w, h
    scale = spec.resize_size / min(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    left, top = (new_w - spec.input_size) / 2 / scale, (new_h - spec.input_size) / 2 / scale
    side = spec.input_size / scale
    return round(left), round(top), round(left + side), round(top + side)


def normalise(cam: np.ndarray, scale: float | None = None) -> np.ndarray:
    """One class's map (h x w) ReLU'd and scaled to [0, 1]: cam / scale clipped (the model's one scale), or, with
    scale None (a model exported before xray.cam_scale), cam / its own maximum."""
    cam = np.maximum(np.asarray(cam, np.float32), 0)
    if scale is not None:
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"heatmap scale must be a positive number, got {scale!r}")
        return np.minimum(cam / np.float32(scale), 1.0)
    return cam / cam.max() if cam.max() > 0 else cam


def heat(size: tuple[int, int], cam: np.ndarray, spec: ImageSpec, scale: float | None = None) -> np.ndarray:
    """One class's map (h x w; ReLU'd and scaled to [0, 1] here: `normalise`) over an image of `size` (w, h):
    H x W float32, 0 outside the region the model saw."""
    cam = normalise(cam, scale)
    box = input_region(size, spec)
    canvas = Image.new("F", size, 0.0)  # paste clips what falls outside the image
    canvas.paste(Image.fromarray(cam, "F").resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR), box[:2])
    return np.asarray(canvas)


def heat_layer(size: tuple[int, int], cam: np.ndarray, spec: ImageSpec, scale: float | None = None) -> Image.Image:
    """The map alone as an RGBA layer of `size`: the colour ramp, opaque in proportion to the activation (up to
    ALPHA at the scale), clear elsewhere, for a viewer to lay over the image and fade. No caption: the viewer
    names the class."""
    full = heat(size, cam, spec, scale)
    rgba = np.dstack([jet(full), np.rint(255 * ALPHA * full).astype(np.uint8)])
    return Image.fromarray(rgba, "RGBA")


def overlay(image: Image.Image, cam: np.ndarray, spec: ImageSpec, caption: str,
            scale: float | None = None) -> Image.Image:
    """image: 8-bit grayscale original; cam: h x w map of one class (ReLU'd and scaled to [0, 1] here, by the
    model's scale or, None, per image)."""
    full = heat(image.size, cam, spec, scale)
    gray = np.asarray(image.convert("RGB"), np.float32)
    a = (ALPHA * full)[..., None]
    out = Image.fromarray((gray * (1 - a) + jet(full).astype(np.float32) * a).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, image.size[1] // 30))
    left, top, right, bottom = draw.textbbox((4, 4), caption, font=font)
    draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255), font=font)
    return out


def heatmap_name(path: str, label: str, probability: float | None, used: set) -> str:
    """<stem>.<CLASS>_<probability>.png, with -2, -3, ... when two inputs share a stem."""
    p = f"_{probability:.2f}" if probability is not None else ""
    base = f"{Path(path).stem}.{label}{p}"
    name, k = f"{base}.png", 1
    while name in used:
        k += 1
        name = f"{base}-{k}.png"
    used.add(name)
    return name


def write_heatmap(out_dir: Path, name: str, image: Image.Image, cam: np.ndarray, spec: ImageSpec, caption: str,
                  scale: float | None = None) -> Path:
    path = Path(out_dir) / name
    with atomic_path(path) as tmp:
        overlay(image, cam, spec, caption, scale).save(tmp, format="PNG")
    return path
