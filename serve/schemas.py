"""Response shapes, for the OpenAPI document at /docs (the handlers return the same fields)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Detail(BaseModel):
    detail: str  # one line saying what was wrong


class Outbox(BaseModel):
    backlog: int  # DICOM reports on disk waiting for the PACS
    oldest_age_s: float  # the oldest one's age (0: none)
    destination: str  # AE@HOST:PORT


class Health(BaseModel):
    status: str


class Ready(Health):
    outbox: Outbox | None = None  # with the DICOM node and --send-to


class ImageError(BaseModel):
    kind: str  # empty | not_an_image | corrupt | too_many_pixels | bad_dicom
    message: str  # one line


class Prediction(BaseModel):
    file: str
    prediction: str | None = None  # a class, or OUT_OF_DISTRIBUTION with ood_action=abstain
    probability: float | None = None
    probabilities: dict[str, float] | None = None
    top_k: list[dict] | None = None
    ood: bool | None = None  # models with the out-of-distribution guard
    ood_score: float | None = None
    reason: str | None = None  # why a flagged image is not to be trusted
    preview: str | None = None  # ?preview=true: data:image/jpeg URL of the decoded image (longest side <= 1024)
    heatmap: str | None = None  # ?heatmap=true: data:image/png URL, a transparent layer of the preview's size
    heatmap_class: str | None = None  # the class the heatmap shows
    error: ImageError | None = None  # instead of the fields above when this image failed


class ModelRef(BaseModel):
    name: str
    precision: str
    checkpoint_sha256: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]
    detail: str | None = None  # on 422: why no image could be used


class HeatmapScale(BaseModel):
    scale: Literal["model", "per_image"]  # one scale for the model (xray.cam_scale), or each map on its own maximum
    value: float | None  # the model's scale (the CAM value drawn at full colour); None: per image
    legend: str  # one sentence saying what the colours mean


class Metadata(BaseModel):
    model_name: str
    file: str
    precision: str
    classes: list[str]
    image_spec: dict
    checkpoint_sha256: str
    export_date: str
    verification: dict
    ood_guard: dict | None
    heatmaps: bool
    heatmap: HeatmapScale | None  # how the heatmaps' colours are scaled and what they mean; None: no heatmaps
    chosen_because: str | None
    onnxruntime: str
    cpu_class: str | None  # this CPU's class for int8 (avx2, avx512_vnni, arm64_dotprod, ...); None: none of them
    int8_cpu_classes: dict | None  # an int8 model's {"covered": [...], "verified": [...]}
    limits: dict
    ood_action: str
    notice: str
