"""What a clinician sees of one image, as data URLs in the answer: `preview` (the decoded image after DICOM
rescale / VOI / inversion, before the model's resize) and `heatmap` (the class activation map as a
transparent layer of the preview's size, to lay over it and fade). Both are asked for per request and cost
nothing when not: the model computes the maps only for a request that wants them. The heatmap's colours are on
the model's one scale (`xray.cam_scale`; per image for a model exported before it): /v1/metadata's `heatmap`
says which, and what the colours mean (`heatmap_legend`)."""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from PIL import Image

from xray.infer.heatmap import heat_layer, legend

PREVIEW_MAX_SIDE = 1024
JPEG_QUALITY = 85  # a glance at the film, not diagnosis: small and quick to encode


@dataclass(frozen=True)
class Views:
    preview: bool = False
    heatmap: bool = False
    heatmap_class: int | None = None  # index into the model's classes; None: the predicted class

    @property
    def wanted(self) -> bool:
        return self.preview or self.heatmap


def shrink(image: Image.Image) -> Image.Image:
    """The preview's pixels: the decoded image (ours, changed in place), longest side at most PREVIEW_MAX_SIDE."""
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), Image.Resampling.BILINEAR)
    return image


def data_url(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, "PNG", compress_level=1)  # speed over a few kB
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def heatmap_legend(model) -> dict | None:
    """/v1/metadata's `heatmap` for an EdgeModel: {"scale": "model" | "per_image", "value": the model's scale or
    None, "legend": one sentence saying what the colours mean}; None for a model without heatmaps."""
    return legend(model.info.cam_scale_value) if model.has_cam else None


def render(image: Image.Image, views: Views, record: dict, cam, classes: list[str], spec,
           scale: float | None = None) -> dict:
    """The fields `preview` / `heatmap` for one classified image's record. A heatmap covers the predicted
    class, or views.heatmap_class; an image the guard abstained on (no class predicted) gets none unless a
    class is named. scale: the model's cam scale (ModelInfo.cam_scale_value); None draws each map on its own
    maximum (models exported before xray.cam_scale)."""
    out = {}
    if views.preview:
        out["preview"] = data_url(image, "JPEG")
    if views.heatmap and cam is not None:
        index = views.heatmap_class
        if index is None and record.get("prediction") in classes:
            index = classes.index(record["prediction"])
        if index is not None:
            out["heatmap"] = data_url(heat_layer(image.size, cam[index], spec, scale), "PNG")
            out["heatmap_class"] = classes[index]
    return out
