"""Static int8 quantization with onnxruntime: QDQ, per-channel weights, calibrated on real images.

Choices, by measurement on this CPU (2 threads, batch 1, 224 px; see the issue note):
- activations uint8, weights int8 (U8S8): onnxruntime's fast path on x86. Signed activations made
  EfficientNet-Lite0 no faster than fp32 and B0 3x slower.
- every op the quantizer supports is quantized: leaving B0's Sigmoid/Mul in float (Conv/Gemm only)
  inserted so many Q/DQ pairs that int8 ran at 0.7x fp32.
- reduce_range only on CPUs without VNNI/AMX (7-bit weights avoid overflow in the non-VNNI kernels).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from xray.common.artifacts import atomic_path

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


def cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@dataclass
class QuantSettings:
    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    quant_format: str = "QDQ"
    op_types: list[str] | None = None  # None: every op type the quantizer supports
    exclude_nodes: list[str] | None = None
    calibration_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def default_settings(method: str = "minmax") -> QuantSettings:
    """One recipe for every registry model so far; per-backbone exclusions go here once measured."""
    return QuantSettings(method=method, reduce_range=not cpu_has_vnni())


class ArrayReader(CalibrationDataReader):
    """Feeds preprocessed calibration batches (N x C x H x W float32) to the calibrator."""

    def __init__(self, batches, input_name: str):
        self.batches = list(batches)
        self.input_name = input_name
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize(fp32_path: Path, out_path: Path, batches: list[np.ndarray], settings: QuantSettings,
             input_name: str = "input") -> None:
    """quant_pre_process (shape inference + graph optimisation), then quantize_static."""
    settings.calibration_images = int(sum(len(b) for b in batches))
    pre = out_path.with_name(f".{out_path.stem}.pre.onnx")
    try:
        quantize_to(fp32_path, pre, out_path, batches, settings, input_name)
    finally:
        pre.unlink(missing_ok=True)


def quantize_to(fp32_path, pre, out_path, batches, settings, input_name):
    with atomic_path(out_path) as tmp:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        quantize_static(
            str(pre), str(tmp), ArrayReader(batches, input_name),
            quant_format=QuantFormat.QDQ if settings.quant_format == "QDQ" else QuantFormat.QOperator,
            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8 if settings.weight_type == "int8" else QuantType.QUInt8,
            calibrate_method=METHODS[settings.method], op_types_to_quantize=settings.op_types,
            nodes_to_exclude=settings.exclude_nodes or [],
        )
