"""What the node sends back for one classified instance: the SR, and with --send-heatmap the overlay as a
Secondary Capture. Built once, in the association's thread, so they can be on disk before the C-STORE is
acknowledged. Their series and SOP Instance UIDs are functions of (the source's SOP Instance UID, the model's
checkpoint, the object's kind): the same instance read by the same model always yields the same objects, so a
modality's retry, a re-pushed study or a resend after a crash never files a second report."""
from __future__ import annotations

import numpy as np
import pydicom

from .sr import build_heatmap_sc, build_sr, stable_uid


def model_identity(service) -> dict:
    """The model as the SR names it (observer device, algorithm identification)."""
    info = service.model.info
    return {"name": info.model_name, "precision": info.precision, "checkpoint_sha256": info.checkpoint_sha256,
            "version": package_version(), "classes": list(info.classes), "manufacturer": "xray-edge"}


def build_reports(source: pydicom.Dataset, record: dict, model: dict, spec, heatmap=None) -> list[pydicom.Dataset]:
    """[SR] or [SR, heatmap SC]; heatmap: (the decoded image, its class activation maps[, the model's cam scale])."""
    objects = [build_sr(source, record, model, **report_uids(source, model, "sr"))]
    if heatmap is not None:
        objects.append(heatmap_sc(source, record, spec, *heatmap, **report_uids(source, model, "sc")))
    return objects


def report_uids(source: pydicom.Dataset, model: dict, kind: str) -> dict:
    """The series and SOP Instance UIDs of the `kind` object ("sr", "sc") made from this source by this model
    (`2.25.` + a UUID5, PS3.5 B.2); random for a source without a SOP Instance UID (nothing to derive them from)."""
    meta = getattr(source, "file_meta", None) or {}
    source_uid = str(source.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
    if not source_uid:
        return {}
    model_id = model.get("checkpoint_sha256") or f"{model.get('name')}:{model.get('version')}"
    return {"series_instance_uid": stable_uid("series", kind, source_uid, model_id),
            "sop_instance_uid": stable_uid("instance", kind, source_uid, model_id)}


def heatmap_sc(source, record, spec, image, cam, scale=None, **uids) -> pydicom.Dataset:
    """image: the instance as decoded for classification, shrunk to at most 1024 px (serve.views.shrink)."""
    from xray.infer.heatmap import overlay

    best = int(np.argmax(list(record["probabilities"].values())))  # in the model's class order
    caption = f"{record['prediction']} {record['probability']:.2f} - xray-edge, research use only"
    return build_heatmap_sc(source, np.asarray(overlay(image, cam[best], spec, caption, scale)), **uids)


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("xray-edge")
    except Exception:
        return "unknown"
