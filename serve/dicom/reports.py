"""What the node sends back for one classified instance: the SR, and with --send-heatmap the overlay as a
Secondary Capture. Built once, in the association's thread, so they can be on disk before the C-STORE is
acknowledged."""
from __future__ import annotations

import numpy as np
import pydicom

from .sr import build_heatmap_sc, build_sr



def model_identity(service) -> dict:
    """The model as the SR names it (observer device, algorithm identification)."""
    info = service.model.info
    return {"name": info.model_name, "precision": info.precision, "checkpoint_sha256": info.checkpoint_sha256,
            "version": package_version(), "classes": list(info.classes), "manufacturer": "xray-edge"}


def build_reports(source: pydicom.Dataset, record: dict, model: dict, spec, heatmap=None) -> list[pydicom.Dataset]:
    """[SR] or [SR, heatmap SC]; heatmap: (the decoded image, its class activation maps)."""
    objects = [build_sr(source, record, model)]
    if heatmap is not None:
        objects.append(heatmap_sc(source, record, spec, *heatmap))
    return objects


def heatmap_sc(source, record, spec, image, cam) -> pydicom.Dataset:
    """image: the instance as decoded for classification, shrunk to at most 1024 px (serve.views.shrink)."""
    from xray.infer.heatmap import overlay

    best = int(np.argmax(list(record["probabilities"].values())))  # in the model's class order
    caption = f"{record['prediction']} {record['probability']:.2f} - xray-edge, research use only"
    return build_heatmap_sc(source, np.asarray(overlay(image, cam[best], spec, caption)))


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("xray-edge")
    except Exception:
        return "unknown"
