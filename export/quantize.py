"""Static int8 quantization with onnxruntime: QDQ, per-channel weights, calibrated on real images.

Choices, by measurement on this CPU (2 threads, batch 1, 224 px; see the issue note):
- activations uint8, weights int8 (U8S8): onnxruntime's fast path on x86. Signed activations made
  EfficientNet-Lite0 no faster than fp32 and B0 3x slower.
- every op the quantizer supports is quantized: leaving B0's Sigmoid/Mul in float (Conv/Gemm only)
  inserted so many Q/DQ pairs that int8 ran at 0.7x fp32.
- reduce_range on every export, whatever CPU runs it (a portable file): 7-bit weights cannot overflow the
  u8s8 kernels of CPUs without VNNI (AVX2, AVX-512), and the file may be copied to one. Only weights that go
  through MLAS's u8s8 GEMM / ConvSym kernels: depthwise convs run in MLAS's depthwise kernels, which never
  saturate, so they keep 8-bit weights (measured: 8-bit pointwise weights on AVX2 lose 13 points to
  saturation; export/portability.py checks the weights and the kernels on every export). Measured on
  the demo model on a VNNI machine: the same accuracy and latency as full 8-bit weights.
  `full_range` (xray-export --int8-full-range) gives 8-bit weights everywhere: right only on VNNI/AMX/Arm.
- GPTQ weight rounding after quantize_static (export/gptq.py): same scales, integers chosen to minimise
  each layer's output error on calibration images instead of each weight's own rounding error.
- sequential bias correction after GPTQ: weight rounding on smooth X-ray inputs leaves a
  per-channel DC offset that global pooling passes to the logits (EfficientNet-Lite0: logits shifted
  -0.47 on one class, agreement 0.83); each Conv/Gemm bias is re-centred on the float model's mean.
- the OOD score sub-graph computes in float (`float_scopes`): squared whitened distances have a huge
  range, and an int8 grid calibrated on chest films would saturate exactly on the strange inputs; only
  its basis matrix is stored as int8 (weight-only, one scale per column: `weight_only_int8`).
  The CAM's 1x1 convolution stays float too (int8 heatmaps then correlate with PyTorch's at 0.99+).
- shorter tensor names (export/compact.py): B0's int8 file 30.8 % -> 29.4 % of fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from xray.common.artifacts import atomic_path

from .compact import compact_names
from .gptq import gptq_round
from .probe import attribute, probe_session

METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


@dataclass
class QuantSettings:
    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = True  # 7-bit matrix weights: right on every CPU class (False: VNNI/AMX/Arm only)
    quant_format: str = "QDQ"
    op_types: list[str] | None = None  # None: every op type the quantizer supports
    exclude_nodes: list[str] | None = None
    float_scopes: tuple[str, ...] = ("/ood_score/", "/cam/")  # kept in float: the trust outputs (edge_graph.py)
    calibration_images: int = 0
    full_range_depthwise: bool = True  # 8-bit depthwise weights even with reduce_range (no saturation there)
    gptq_images: int = 64  # GPTQ weight rounding from this many calibration images; 0: round to nearest
    bias_correction_images: int = 64  # sequential bias correction on this many calibration images; 0: off

    def to_dict(self) -> dict:
        return asdict(self)


def default_settings(method: str = "minmax", bias_correction_images: int = 64, gptq_images: int = 64,
                     full_range: bool = False) -> QuantSettings:
    """One recipe for every registry model so far, the same on every export machine; per-backbone exclusions go
    here once measured."""
    return QuantSettings(method=method, reduce_range=not full_range, bias_correction_images=bias_correction_images,
                         gptq_images=gptq_images)


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
             input_name: str = "input", log=lambda msg: None) -> dict:
    """quant_pre_process (shape inference + graph optimisation), quantize_static, GPTQ, bias correction.
    Returns diagnostics for the report."""
    settings.calibration_images = int(sum(len(b) for b in batches))
    pre = out_path.with_name(f".{out_path.stem}.pre.onnx")
    try:
        return quantize_to(fp32_path, pre, out_path, batches, settings, input_name, log)
    finally:
        pre.unlink(missing_ok=True)


def depthwise_weights(model_path) -> list[str]:
    """Weight initializers of grouped (depthwise) Conv nodes."""
    m = onnx.load(str(model_path))
    inits = {i.name for i in m.graph.initializer}
    return [n.input[1] for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits
            and attribute(n, "group", 1) > 1]


def float_nodes(model_path, scopes) -> list[str]:
    """Names of the nodes under the given exporter scopes (the OOD score sub-graph)."""
    return [n.name for n in onnx.load(str(model_path)).graph.node if n.name.startswith(tuple(scopes))]


def weight_only_int8(model: onnx.ModelProto, scopes) -> int:
    """In place: each 2-D weight of a MatMul under `scopes` stored as int8 with one scale per output column,
    dequantized to float before the (float) MatMul: the Mahalanobis basis (D x 256 floats, 1.3 MB for D = 1280)
    takes a quarter of that, and the score keeps its float arithmetic. Returns the bytes saved."""
    inits = {i.name: i for i in model.graph.initializer}
    saved = 0
    for node in [n for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith(tuple(scopes))]:
        name = node.input[1]
        if name not in inits or len(inits[name].dims) != 2:
            continue
        w = numpy_helper.to_array(inits[name]).astype(np.float64)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_q"),
                                        numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                                        numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero")])
        dq = onnx.helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [f"{name}_dq"],
                                   name=f"{node.name}_weight_dq", axis=1)
        model.graph.node.insert(list(model.graph.node).index(node), dq)
        node.input[1] = f"{name}_dq"
        saved += w.size * 3
    return saved


def _channel_means(model: onnx.ModelProto, names: list[str], x: np.ndarray, bs: int = 16) -> dict:
    """Per-channel (axis 1) mean of each named tensor over x; graph optimisation off, so a QDQ model runs
    as its float simulation (which matches the fused int8 kernels here: agreement 0.8350 vs 0.8325)."""
    sess = probe_session(model, names, optimize=False)
    sums, count = {t: 0.0 for t in names}, {t: 0 for t in names}
    for i in range(0, len(x), bs):
        for t, v in zip(names, sess.run(names, {sess.get_inputs()[0].name: x[i:i + bs]})):
            sums[t] = sums[t] + v.astype(np.float64).sum(axis=(0,) + tuple(range(2, v.ndim)))
            count[t] += v.size // v.shape[1]
    return {t: sums[t] / count[t] for t in names}


def sequential_bias_correction(qdq_path, float_path, x: np.ndarray) -> None:
    """In place. Conv/Gemm nodes in graph order: shift each int32 bias so the node's per-channel output
    mean on x equals the float model's, with every earlier node already corrected (empirical bias
    correction, Nagel et al. 2019). One pass of the QDQ model per node."""
    fm, qm = onnx.load(str(float_path)), onnx.load(str(qdq_path))
    fout = {n.name: n.output[0] for n in fm.graph.node if n.op_type in ("Conv", "Gemm")}
    inits = {i.name: i for i in qm.graph.initializer}
    producer = {o: n for n in qm.graph.node for o in n.output}
    layers = [(n, producer[n.input[2]]) for n in qm.graph.node
              if n.op_type in ("Conv", "Gemm") and n.name in fout and len(n.input) > 2
              and getattr(producer.get(n.input[2]), "op_type", "") == "DequantizeLinear"]
    target = _channel_means(fm, [fout[n.name] for n, _ in layers], x)
    for n, bias_dq in layers:
        shift = _channel_means(qm, [n.output[0]], x)[n.output[0]] - target[fout[n.name]]
        q = inits[bias_dq.input[0]]
        scale = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(q).astype(np.int64) - np.round(shift / scale).astype(np.int64)
        q.CopyFrom(numpy_helper.from_array(np.clip(b, -2**31, 2**31 - 1).astype(np.int32), q.name))
    onnx.save(qm, str(qdq_path))


def quantize_to(fp32_path, pre, out_path, batches, settings, input_name, log) -> dict:
    diagnostics = {}
    with atomic_path(out_path) as tmp:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        extra = {}
        if settings.reduce_range and settings.per_channel and settings.full_range_depthwise:
            extra["TensorQuantOverrides"] = {w: [{"axis": 0, "reduce_range": False}] for w in depthwise_weights(pre)}
        quantize_static(
            str(pre), str(tmp), ArrayReader(batches, input_name),
            quant_format=QuantFormat.QDQ if settings.quant_format == "QDQ" else QuantFormat.QOperator,
            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8 if settings.weight_type == "int8" else QuantType.QUInt8,
            calibrate_method=METHODS[settings.method], op_types_to_quantize=settings.op_types,
            nodes_to_exclude=(settings.exclude_nodes or []) + float_nodes(pre, settings.float_scopes),
            extra_options=extra,
        )
        calibration = np.concatenate(batches)  # stratified: classes interleaved, so any prefix is balanced
        if settings.gptq_images:
            log(f"quantize: GPTQ weight rounding on {min(settings.gptq_images, len(calibration))} images")
            errors = gptq_round(tmp, pre, calibration[:settings.gptq_images])
            ratios = [after / before for before, after in errors.values() if before > 0]
            diagnostics["gptq_layers"] = len(errors)
            diagnostics["gptq_output_error_ratio_median"] = float(np.median(ratios)) if ratios else None
        if settings.bias_correction_images:
            log(f"quantize: sequential bias correction on {min(settings.bias_correction_images, len(calibration))} images")
            sequential_bias_correction(tmp, pre, calibration[:settings.bias_correction_images])
        qm = onnx.load(str(tmp))
        diagnostics["float_scope_weights_int8_bytes_saved"] = weight_only_int8(qm, settings.float_scopes)
        onnx.save(compact_names(qm), str(tmp))
    return diagnostics
