"""The heatmaps' scale: one number per model file, measured on the val split, stored as `xray.cam_scale`.

xray-infer and xray-serve draw a class's map as cam / scale, clipped to [0, 1] (infer/heatmap.py), so the
colour says how strong the evidence is, not only where it is: a class at 1 % stays faint where the
predicted class is hot. (Before this, each map was divided by its own maximum and every class looked as
hot as the prediction.)

The number: for each class, the 99th percentile of the positive values of the maps of the val images
predicted as that class - that class's strongest evidence, robust to a few extreme pixels - and the median of
these over the classes: the model's typical strongest evidence. Val split: the split the guard's threshold
and the temperature are fitted on. Positive values only: the drawing ReLUs the map, and how many pixels are
negative varies from model to model. The median over classes, not one percentile over every pixel: evidence
differs by class (demo model, 224 px: TUBERCULOSIS's nodules peak at ~17, PNEUMONIA's consolidation at ~4,
NORMAL at ~2), and a pooled percentile is the most concentrated class's alone (16.8 there, drawing a typical
NORMAL prediction at 12 % and PNEUMONIA at 22 % of full colour, barely visible); the median (5.3 there: 38 %,
69 %, TUBERCULOSIS saturated on a quarter of its map) is also not moved by how many val images each class has.

One number per model, not per class: every class's map is in the same units (mean(cam[c]) + bias[c] is
logit c, export/edge_graph.py), so one divisor keeps classes comparable - a map 10x weaker than the
prediction's is drawn 10x fainter. A per-class scale would stretch a class that is rarely strong up to
full colour again, the very thing this fixes.

Per model file: the int8 model's maps differ from fp32's by a few per cent, so each file gets its own scale
from its own outputs (the export log shows how far apart they are).
"""
from __future__ import annotations

import numpy as np

from xray.common.image_spec import ImageSpec

from .verify import file_batches

PERCENTILE = 99.0


def predicted_class_values(logits: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits: N x classes, cam: N x classes x h x w -> (each image's predicted class, its map): N, N x h x w."""
    predicted = np.asarray(logits).argmax(1)
    return predicted, np.asarray(cam, np.float64)[np.arange(len(predicted)), predicted]


def cam_scale(predicted: np.ndarray, maps: np.ndarray, classes: list[str]) -> dict:
    """The metadata value (xray.cam_scale) from each val image's predicted class and its map, or {} when there is
    nothing to measure (no val image, no positive value): such a model's heatmaps fall back to one scale per
    image, as models exported before."""
    per_class = {}
    for c, name in enumerate(classes):
        values = maps[predicted == c]
        values = values[values > 0]
        if values.size:
            per_class[name] = float(np.percentile(values, PERCENTILE))
    value = float(np.median(list(per_class.values()))) if per_class else 0.0
    if not (np.isfinite(value) and value > 0):
        return {}
    return {"value": value,
            "method": f"p{PERCENTILE:g} of the predicted class's CAM (positive values) over {len(predicted)} val "
                      f"images, per predicted class; median over the {len(per_class)} classes",
            "percentile": PERCENTILE, "images": int(len(predicted)), "per_class": per_class}


def measure(sess, paths, spec: ImageSpec, classes: list[str]) -> dict:
    """One ONNX model's scale from its own logits and maps over the image files `paths` (the val split)."""
    name = sess.get_inputs()[0].name
    runs = [predicted_class_values(*sess.run(["logits", "cam"], {name: x})) for x in file_batches(paths, spec)]
    if not runs:
        return {}
    return cam_scale(np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs]), classes)


def summary(scales: dict[str, dict]) -> str:
    """One log line: each model file's scale, and int8's difference from fp32's."""
    fp32, int8 = scales.get("onnx_fp32") or {}, scales.get("onnx_int8") or {}
    if not fp32:
        return "heatmaps: no val image with a positive map: heatmaps will be scaled per image"
    line = f"heatmaps: one scale per model, {fp32['method']}: fp32 {fp32['value']:.4g}"
    if int8:
        line += f", int8 {int8['value']:.4g} ({(int8['value'] / fp32['value'] - 1) * 100:+.1f}%)"
    return line
