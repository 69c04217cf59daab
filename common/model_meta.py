"""What an exported ONNX model says about itself (`metadata_props`), so xray-infer needs nothing else.

Values are strings (ONNX metadata is string->string); structured ones are JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import XrayError
from .image_spec import ImageSpec

FORMAT_VERSION = "1"
KEYS = ("xray.format_version", "xray.classes", "xray.image_spec", "xray.model_name", "xray.checkpoint_sha256",
        "xray.export_date", "xray.precision", "xray.verification", "xray.ood", "xray.quantization",
        "xray.int8_cpu_classes", "xray.cam_scale")


@dataclass
class ModelInfo:
    classes: list[str]
    spec: ImageSpec
    model_name: str
    checkpoint_sha256: str = ""
    export_date: str = ""
    precision: str = "fp32"
    verification: dict = field(default_factory=dict)
    ood: dict = field(default_factory=dict)  # the guard: score, threshold, accept, ...; {} for older models
    quantization: dict = field(default_factory=dict)  # int8 only: the quantizer's settings; {} before they were kept
    int8_cpu_classes: dict = field(default_factory=dict)  # int8 only: {"covered": [...], "verified": [...]}
    # the heatmaps' one scale for every class and image: {"value": v > 0, "method": "..."}; {} for older models
    cam_scale: dict = field(default_factory=dict)

    @property
    def cam_scale_value(self) -> float | None:
        """The CAM value drawn at full colour (xray.cam_scale); None: exported before it, heatmaps scale per image."""
        return float(self.cam_scale["value"]) if self.cam_scale else None

    def to_metadata(self) -> dict[str, str]:
        return {"xray.format_version": FORMAT_VERSION, "xray.classes": json.dumps(self.classes),
                "xray.image_spec": self.spec.to_json(), "xray.model_name": self.model_name,
                "xray.checkpoint_sha256": self.checkpoint_sha256, "xray.export_date": self.export_date,
                "xray.precision": self.precision, "xray.verification": json.dumps(self.verification),
                **({"xray.ood": json.dumps(self.ood)} if self.ood else {}),
                **({"xray.quantization": json.dumps(self.quantization)} if self.quantization else {}),
                **({"xray.int8_cpu_classes": json.dumps(self.int8_cpu_classes)} if self.int8_cpu_classes else {}),
                **({"xray.cam_scale": json.dumps(self.cam_scale)} if self.cam_scale else {})}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> "ModelInfo":
        missing = [k for k in ("xray.classes", "xray.image_spec", "xray.model_name") if k not in meta]
        if missing:
            raise XrayError(f"{source}: not an xray-edge model (metadata {', '.join(missing)} missing); "
                            "export it with xray-export")
        try:
            classes = json.loads(meta["xray.classes"])
            verification = json.loads(meta.get("xray.verification") or "{}")
            ood = json.loads(meta.get("xray.ood") or "{}")
            quantization = json.loads(meta.get("xray.quantization") or "{}")
            cpu_classes = json.loads(meta.get("xray.int8_cpu_classes") or "{}")
            cam_scale = json.loads(meta.get("xray.cam_scale") or "{}")
        except json.JSONDecodeError as e:
            raise XrayError(f"{source}: corrupt xray metadata ({e})") from None
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise XrayError(f"{source}: corrupt xray metadata (classes)")
        if cam_scale and not valid_cam_scale(cam_scale):
            raise XrayError(f"{source}: corrupt xray metadata (cam_scale: a positive finite \"value\" expected)")
        return cls(classes=classes, spec=ImageSpec.from_json(meta["xray.image_spec"]),
                   model_name=meta["xray.model_name"], checkpoint_sha256=meta.get("xray.checkpoint_sha256", ""),
                   export_date=meta.get("xray.export_date", ""), precision=meta.get("xray.precision", "fp32"),
                   verification=verification, ood=ood, quantization=quantization, int8_cpu_classes=cpu_classes,
                   cam_scale=cam_scale)


def valid_cam_scale(cam_scale) -> bool:
    value = cam_scale.get("value") if isinstance(cam_scale, dict) else None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
