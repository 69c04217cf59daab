"""Is the int8 model right on every CPU class it may run on?

onnxruntime fuses a QDQ graph into int8 kernels chosen from CPUID. Without VNNI (the `avx2` and `avx512`
classes) its u8s8 matrix kernels add pairs of u8 x s8 products into a saturating int16 (`vpmaddubsw`):
255 x 127 x 2 = 64,770 overflows 32,767, while 7-bit weights (|w| <= 64: 32,640) cannot. VNNI, AMX and Arm
accumulate in int32. Depthwise convolutions run in MLAS's depthwise kernels, which widen to 16/32 bits first
and never saturate, so they may keep 8 bits everywhere. Arm's kernels without dot product (and its depthwise
kernels) add two products into a wrapping int16 that only a weight of -128 can overflow; the symmetric
quantizer's weights stay within [-127, 127], and the check makes sure.

Three checks, each can fail on any host:
- static: the weights of every int8 Conv/Gemm/MatMul fit the kernels of each class it claims ("covered");
- native: the fused int8 model agrees with onnxruntime's unfused reference of the same graph
  (ORT_DISABLE_ALL: DequantizeLinear + float ops, which no kernel can saturate);
- emulated: the same under `qemu-x86_64 -cpu Haswell` (export/emulate.py), which runs the avx2 kernels.
A class where the fused run agreed with the reference is "verified".
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from xray.common.cpu import CPU_CLASSES, SATURATING_CLASSES, Cpu
from xray.common.metrics import softmax

from .emulate import EMULATED, emulator, run_emulated
from .probe import attribute
from .verify import file_batches, session

MATRIX_OPS = ("Conv", "Gemm", "MatMul")
PAIR_SAFE_MAX = 64  # |w| <= 64: two u8 x s8 products sum to at most 255 * 128 = 32,640 < 32,767


@dataclass
class Int8Weight:
    name: str
    op: str
    depthwise: bool
    max_abs: int  # largest |integer - zero point|
    signed: bool
    has_min_int8: bool  # holds -128 (signed weights only)


def int8_weights(model: onnx.ModelProto) -> list[Int8Weight]:
    """The integer weights of every Conv/Gemm/MatMul that onnxruntime runs as an int8 kernel: both its data and
    its weight come from DequantizeLinear (a float-input MatMul with a dequantized weight stays float)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in MATRIX_OPS or len(node.input) < 2:
            continue
        data, weight = producer.get(node.input[0]), producer.get(node.input[1])
        if not (data and weight and data.op_type == weight.op_type == "DequantizeLinear"):
            continue
        if weight.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[weight.input[0]]).astype(np.int32)
        zero = (numpy_helper.to_array(inits[weight.input[2]]).astype(np.int32)
                if len(weight.input) > 2 and weight.input[2] in inits else np.zeros(1, np.int32))
        if zero.size > 1:  # per-channel zero points along axis 0
            zero = zero.reshape((-1,) + (1,) * (q.ndim - 1))
        out.append(Int8Weight(weight.input[0], node.op_type,
                              node.op_type == "Conv" and attribute(node, "group", 1) > 1,
                              int(np.abs(q - zero).max()) if q.size else 0,
                              inits[weight.input[0]].data_type == onnx.TensorProto.INT8,
                              bool(inits[weight.input[0]].data_type == onnx.TensorProto.INT8 and (q == -128).any())))
    return out


def weight_check(model: onnx.ModelProto) -> dict:
    """The static check: the CPU classes whose kernels every int8 weight fits ("covered"), and why not the others."""
    weights = int8_weights(model)
    matrix = [w for w in weights if not w.depthwise and w.signed]
    too_wide = [w.name for w in matrix if w.max_abs > PAIR_SAFE_MAX]
    minus_128 = [w.name for w in weights if w.has_min_int8]
    covered = [c for c in CPU_CLASSES if not (too_wide and c in SATURATING_CLASSES)
               and not (minus_128 and c.startswith("arm64"))]
    return {"int8_layers": len(weights), "depthwise_layers": sum(w.depthwise for w in weights),
            "u8s8_matrix_layers": len(matrix), "unsigned_weight_layers": sum(not w.signed for w in weights),
            "u8s8_matrix_max_abs_weight": max((w.max_abs for w in matrix), default=0),
            "pair_safe_max_abs_weight": PAIR_SAFE_MAX, "layers_over_pair_safe": len(too_wide),
            "layers_with_minus_128": len(minus_128), "covered": covered}


def reference_session(path, threads: int):
    """onnxruntime's unfused reference of a QDQ graph: DequantizeLinear + float ops, no int8 kernel."""
    return session(path, threads, fused=False)


MAX_KERNEL_ERROR_RATIO = 1.0  # measured: 0.34-0.52 for exact kernels, 6.6-6.9 for saturating ones (Lite0, 64-160 px)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()) if a.size else 0.0


def kernel_agreement(fused: list[np.ndarray], reference: list[np.ndarray], fp32: list[np.ndarray],
                     threshold: float | None) -> dict:
    """The fused int8 run (outputs: logits, ood_score, ...) against the unfused reference of the same graph, on
    the same inputs. The yardstick is quantization's own error (reference vs fp32): exact int8 kernels only
    round differently, far less than that; saturating ones add several times more. Scale-free, so the same
    limit holds for any model: kernel_error_ratio = mean |fused - reference| / mean |reference - fp32|, for
    the logits and the OOD score, whichever is worse."""
    pr, pf = softmax(reference[0]), softmax(fused[0])
    ratios = [mean_abs(fused[0], reference[0]) / max(mean_abs(reference[0], fp32[0]), 1e-9)]
    out = {"images": len(pr), "class_agreement": float((pr.argmax(1) == pf.argmax(1)).mean()) if len(pr) else 1.0,
           "max_abs_prob_diff": float(np.abs(pr - pf).max()) if len(pr) else 0.0,
           "mean_abs_logit_diff": mean_abs(fused[0], reference[0]),
           "quantization_mean_abs_logit_diff": mean_abs(reference[0], fp32[0])}
    if threshold is not None and len(reference) > 1 and len(fused) > 1:
        ratios.append(mean_abs(fused[1], reference[1]) / max(mean_abs(reference[1], fp32[1]), 1e-9))
        out["ood_decision_agreement"] = float(((reference[1] > threshold) == (fused[1] > threshold)).mean())
    out["kernel_error_ratio"] = max(ratios)
    out["agrees"] = out["kernel_error_ratio"] <= MAX_KERNEL_ERROR_RATIO
    return out


def verify_portability(int8_path, outputs: dict, threshold: float, static: dict, host: Cpu, eval_paths, spec,
                       emulated_images: int, portable: bool, arm64_root=None, log=lambda msg: None) -> dict:
    """The gate's int8-on-other-CPUs part. outputs: backend -> [logits, ood_score, ...] over the eval images (first
    rows) and the probes, for onnx_int8, onnx_int8_unfused and onnx_fp32. A bounded, evenly spread subset of
    the eval images runs again under emulation for each covered class that is not this CPU's."""
    covered = static["covered"]
    names = ("onnx_int8", "onnx_int8_unfused", "onnx_fp32")
    native = kernel_agreement(*(outputs[k] for k in names), threshold)
    result = {"host": host.cls, "host_source": host.source, "covered": covered, "static": static,
              "native": native, "emulated": {}}
    problems = []
    if portable and set(covered) != set(CPU_CLASSES):
        problems.append(f"the int8 weights do not fit every CPU class's kernels (covered: {', '.join(covered)}; "
                        f"{static['layers_over_pair_safe']} u8s8 layers over ±{PAIR_SAFE_MAX}, "
                        f"{static['layers_with_minus_128']} with -128)")
    verified = []
    if host.cls in covered:
        if native["agrees"]:
            verified.append(host.cls)
        else:
            problems.append(f"on this CPU ({host.cls}) the int8 kernels differ from the unfused reference "
                            f"{native['kernel_error_ratio']:.2f}x quantization's own error (limit {MAX_KERNEL_ERROR_RATIO:g})")
    for cls, (arch, qemu_cpu) in EMULATED.items():
        how = emulator(cls, arm64_root)
        why = (f"this CPU is {cls}: verified natively" if cls == host.cls else
               "not covered" if cls not in covered else
               "--emulated-images 0" if emulated_images <= 0 else how if isinstance(how, str) else None)
        if why:
            result["emulated"][cls] = {"run": False, "why": why}
            continue
        where = f"qemu-{arch} -cpu {qemu_cpu}"
        rows = np.unique(np.linspace(0, len(eval_paths) - 1, min(emulated_images, len(eval_paths))).astype(int))
        x = np.concatenate(list(file_batches([eval_paths[i] for i in rows], spec)))
        log(f"verify: int8 on {len(rows)} images under {where} ({cls} kernels)")
        try:
            fused, seen = run_emulated(int8_path, x, cls, arm64_root=arm64_root)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # the emulator's failure, not the model's
            result["emulated"][cls] = {"run": False, "why": f"{where} failed: {str(e)[:200]}"}
            continue
        a = kernel_agreement(fused, *([o[rows] for o in outputs[k]] for k in names[1:]), threshold)
        if host.cls in verified:  # this CPU's kernels are exact over every eval image: the same outputs (within
            # rounding) on the emulated subset say those kernels are exact too; the ratio to the reference over
            # a handful of images is noisy (1.05 on 6 images where 154 gave 0.30, identical outputs)
            same = kernel_agreement(fused, *([o[rows] for o in outputs[k]] for k in (names[0], names[2])), threshold)
            a["ratio_to_this_cpu"] = same["kernel_error_ratio"]
            a["agrees"] = a["agrees"] or same["agrees"]
        result["emulated"][cls] = {"run": True, "qemu": where, "cpu_class_seen": seen, **a}
        if seen != cls:
            problems.append(f"under {where} the CPU was seen as {seen}, not {cls}")
        elif a["agrees"]:
            verified.append(cls)
        else:
            problems.append(f"under {where} ({cls}) the int8 kernels differ from the unfused reference "
                            f"{a['kernel_error_ratio']:.2f}x quantization's own error (limit {MAX_KERNEL_ERROR_RATIO:g})")
    result.update(verified=verified, problems=problems, ok=not problems)
    return result
