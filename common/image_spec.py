"""The image spec: everything preprocessing needs, saved with every checkpoint and ONNX model.

Training's eval transform, export calibration and xray-infer all build their input from this one
record through `xray.common.preprocess.preprocess`, so parity between them holds by construction.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .errors import XrayError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("shorter_side", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded grayscale radiograph becomes the model's input tensor.

    resize_mode:
      "shorter_side": scale the shorter side to `resize_size`, then center-crop `input_size`
                      (torchvision's Resize(resize_size) + CenterCrop(input_size)).
      "squash":       scale to `resize_size` x `resize_size` ignoring aspect, then center-crop
                      `input_size` (keeps both lung apices and costophrenic angles in view).
    """

    input_size: int = 224
    resize_size: int = 224
    resize_mode: str = "squash"
    interpolation: str = "bilinear"
    channels: int = 3
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self):
        # tuples even when built from JSON lists, so specs compare equal after a round-trip
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.input_size < 8 or self.resize_size < self.input_size:
            raise XrayError(
                f"bad image spec: need 8 <= input_size <= resize_size, got {self.input_size}/{self.resize_size}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise XrayError(f"bad image spec: resize_mode {self.resize_mode!r} not in {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise XrayError(f"bad image spec: interpolation {self.interpolation!r} not in {INTERPOLATIONS}")
        if self.channels not in (1, 3):
            raise XrayError(f"bad image spec: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise XrayError("bad image spec: mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise XrayError("bad image spec: std must be positive")

    def with_size(self, input_size: int) -> "ImageSpec":
        """The same spec at another input size, keeping the resize/crop ratio."""
        ratio = self.resize_size / self.input_size
        return type(self)(**{**self.to_dict(), "input_size": input_size,
                             "resize_size": int(round(input_size * ratio))})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        if not isinstance(d, dict):
            raise XrayError(f"bad image spec: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise XrayError(f"bad image spec: unknown fields {sorted(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise XrayError(f"bad image spec: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "ImageSpec":
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, AttributeError) as e:
            raise XrayError(f"bad image spec JSON: {e}") from None
