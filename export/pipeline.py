"""The export, step by step: checkpoint -> fp32 ONNX -> int8 ONNX -> verification -> gate -> report."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime

from xray.common.artifacts import sha256_file
from xray.common.errors import XrayError
from xray.common.model_meta import ModelInfo
from xray.train.checkpoint import load_checkpoint
from xray.train.models import TemperatureScaled
from xray.train.data import scan_split

from .onnx_export import export_onnx, set_metadata
from .quantize import default_settings, quantize
from .report import write_report
from .verify import NEAR_TIE, batches, compare, flipped_images, latency_ms, run_backends, session, stratified


@dataclass
class ExportOptions:
    checkpoint: Path
    output_dir: Path
    data_dir: str | None
    eval_split: str
    calibration_images: int
    calibration_method: str
    calibration_dir: str | None
    max_accuracy_drop: float
    min_agreement: float
    allow_drop: bool
    parity_tolerance: float
    threads: int
    latency_runs: int
    export_date: str
    bias_correction_images: int = 64
    gptq_images: int = 64


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def resolve_split(data_dir: Path, name: str) -> Path:
    p = Path(name)
    return p if (p.is_dir() and name not in ("train", "val", "test")) else data_dir / name


def run_export(o: ExportOptions) -> bool:
    """Returns True when fp32 parity holds and int8 passed its gate (or --allow-drop)."""
    model, meta = load_checkpoint(o.checkpoint)
    sha = sha256_file(o.checkpoint)
    if meta.get("weights_sha256") and meta["weights_sha256"] != sha:
        raise XrayError(f"{o.checkpoint}: weights do not match their sidecar (sha256 differs); re-save the checkpoint")
    classes, spec = meta["classes"], meta["image_spec"]
    temperature = meta.get("temperature")
    if temperature:  # fitted by xray-eval --calibrate: exported (and verified) as part of the graph
        model = TemperatureScaled(model, temperature).eval()
    data_dir = Path(o.data_dir or meta.get("config", {}).get("data_dir", "data"))
    eval_dir = resolve_split(data_dir, o.eval_split)
    _, eval_samples = scan_split(eval_dir, classes)
    _, calib_pool = scan_split(Path(o.calibration_dir) if o.calibration_dir else data_dir / "train", classes)
    out = o.output_dir
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8, rejected = out / "model.onnx", out / "model.int8.onnx", out / "model.int8.rejected.onnx"

    say(f"export: {meta['model_name']} ({len(classes)} classes, {spec.input_size} px) -> {fp32}")
    export_onnx(model, spec, fp32)
    calib = stratified(calib_pool, o.calibration_images)
    settings = default_settings(o.calibration_method, o.bias_correction_images, o.gptq_images)
    say(f"quantize: calibrating on {len(calib)} images ({o.calibration_method}) -> {int8.name}")
    candidate = out / ".model.int8.candidate.onnx"
    # batch 1: the histogram calibrators (entropy, percentile) fail on multi-image batches
    diagnostics = quantize(fp32, candidate, [x for x, _ in batches(calib, spec, 1)], settings, log=say)

    say(f"verify: PyTorch vs ONNX fp32 vs ONNX int8 on {len(eval_samples)} images of {eval_dir}")
    sessions = {"onnx_fp32": session(fp32, o.threads), "onnx_int8": session(candidate, o.threads)}
    logits, labels = run_backends(eval_samples, spec, model, sessions)
    metrics = compare(logits, labels, classes)
    flips = flipped_images(eval_samples, labels, logits["pytorch"], logits["onnx_int8"], classes)

    parity = metrics["onnx_fp32"]["max_abs_logit_diff"]
    drop = (metrics["pytorch"]["accuracy"] - metrics["onnx_int8"]["accuracy"]) * 100
    agreement = metrics["onnx_int8"]["agreement"]
    parity_ok = parity <= o.parity_tolerance
    int8_ok = drop <= o.max_accuracy_drop and agreement >= o.min_agreement
    status = "pass" if int8_ok else ("FAIL, kept by --allow-drop" if o.allow_drop else "FAIL, rejected")
    gate = {"parity_tolerance": o.parity_tolerance, "parity_ok": parity_ok, "max_accuracy_drop": o.max_accuracy_drop,
            "min_agreement": o.min_agreement, "accuracy_drop_points": drop, "agreement": agreement,
            "int8_ok": int8_ok, "int8_status": status}
    if not int8_ok and o.allow_drop:
        gate["warning"] = (f"int8 failed the gate (drop {drop:.2f} points, agreement {agreement * 100:.2f}%) "
                           "and was kept because of --allow-drop")

    say(f"latency: batch 1 and 16, {o.threads} threads")
    latency = {"threads": o.threads, "runs": o.latency_runs}
    for name, sess in sessions.items():
        latency[name] = {f"batch_{b}": latency_ms(sess, spec, b, o.latency_runs) for b in (1, 16)}
    latency["speedup_batch_1"] = latency["onnx_fp32"]["batch_1"] / latency["onnx_int8"]["batch_1"]
    latency["speedup_batch_16"] = latency["onnx_fp32"]["batch_16"] / latency["onnx_int8"]["batch_16"]
    del sessions

    final_int8 = int8 if (int8_ok or o.allow_drop) else rejected
    for stale in (int8, rejected):
        stale.unlink(missing_ok=True)
    os.replace(candidate, final_int8)
    verification = {"eval_split": str(eval_dir), "images": len(labels), "parity_max_abs_logit_diff": parity,
                    **{f"{k}_accuracy": v["accuracy"] for k, v in metrics.items()},
                    **{f"{k}_macro_f1": v["macro_f1"] for k, v in metrics.items()},
                    "int8_agreement": agreement, "int8_gate": status, "temperature": temperature or 1.0,
                    "onnxruntime": onnxruntime.__version__}
    info = ModelInfo(classes=classes, spec=spec, model_name=meta["model_name"], checkpoint_sha256=sha,
                     export_date=o.export_date, verification=verification)
    set_metadata(fp32, info.to_metadata())
    info.precision = "int8"
    set_metadata(final_int8, info.to_metadata())

    files = {"onnx_fp32": fp32, "onnx_int8": final_int8}
    report = {"model_name": meta["model_name"], "classes": classes, "checkpoint": str(o.checkpoint),
              "checkpoint_sha256": sha, "export_date": o.export_date, "temperature": temperature or 1.0, "image_spec": spec.to_dict(),
              "eval": {"split": str(eval_dir), "images": len(labels)}, "metrics": metrics, "gate": gate,
              "int8_flips": flips, "near_tie": NEAR_TIE,
              "latency": latency, "quantization": settings.to_dict() | diagnostics, "onnxruntime": onnxruntime.__version__,
              "files": {k: {"path": p.name, "mb": p.stat().st_size / 1e6} for k, p in files.items()},
              "size_ratio": final_int8.stat().st_size / fp32.stat().st_size}
    text = write_report(out, report)
    print(text)
    if not parity_ok:
        say(f"error: ONNX fp32 differs from PyTorch by {parity:.2e} (> {o.parity_tolerance:g}); do not ship it")
        return False
    if not int8_ok and not o.allow_drop:
        say(f"error: int8 failed the gate: accuracy drop {drop:.2f} points (limit {o.max_accuracy_drop:g}), agreement "
            f"{agreement * 100:.2f}% (minimum {o.min_agreement * 100:g}%); kept {fp32.name}, wrote {rejected.name}")
        return False
    if gate.get("warning"):
        say("WARNING: " + gate["warning"])
    say(f"exported: {fp32} and {final_int8}; report: {out / 'export_report.md'}")
    return True
