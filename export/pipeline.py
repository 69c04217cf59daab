"""The export, step by step: checkpoint -> fp32 ONNX -> int8 ONNX -> verification -> gate -> report."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from xray.common.artifacts import sha256_file
from xray.common.cpu import detect_cpu
from xray.common.errors import XrayError
from xray.common.imageio import load_image
from xray.common.model_meta import ModelInfo
from xray.common.probes import probe_sets
from xray.train.checkpoint import load_checkpoint
from xray.train.data import scan_split

from . import cam_scale
from .calibrate import before_after, choose_temperature
from .edge_graph import OUTPUT_NAMES, EdgeGraph
from .onnx_export import export_onnx, set_metadata
from .portability import reference_session, verify_portability, weight_check
from .quantize import default_settings, quantize
from .report import write_report
from .trust import check_backends, fit_guard
from .verify import NEAR_TIE, batches, compare, flipped_images, latency_ms, session, stratified


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
    ood_score: str = "auto"
    ood_accept: float = 0.95
    ood_fit_images: int = 2000
    probe_images: int = 12
    min_ood_agreement: float = 0.98
    int8_full_range: bool = False
    emulated_images: int = 16
    calibrate: bool = True
    arm64_root: Path | None = None


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def resolve_split(data_dir: Path, name: str) -> Path:
    p = Path(name)
    return p if (p.is_dir() and name not in ("train", "val", "test")) else data_dir / name


def run_export(o: ExportOptions) -> bool:
    """Returns True when fp32 parity holds and int8 passed its gate (or --allow-drop)."""
    model, meta = load_checkpoint(o.checkpoint)
    model.eval()  # before any forward pass: train mode would move BatchNorm's running statistics
    sha = sha256_file(o.checkpoint)
    if meta.get("weights_sha256") and meta["weights_sha256"] != sha:
        raise XrayError(f"{o.checkpoint}: weights do not match their sidecar (sha256 differs); re-save the checkpoint")
    classes, spec = meta["classes"], meta["image_spec"]
    data_dir = Path(o.data_dir or meta.get("config", {}).get("data_dir", "data"))
    eval_dir = resolve_split(data_dir, o.eval_split)
    _, eval_samples = scan_split(eval_dir, classes)
    _, train_samples = scan_split(data_dir / "train", classes)
    _, val_samples = scan_split(data_dir / "val", classes)
    calib_pool = scan_split(Path(o.calibration_dir), classes)[1] if o.calibration_dir else train_samples
    out = o.output_dir
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "model.onnx", out / "model.int8.onnx"

    fit = stratified(train_samples, o.ood_fit_images)
    probes = probe_sets([load_image(p, draft_size=spec.resize_size) for p, _ in stratified(eval_samples, o.probe_images)],
                        o.probe_images)
    say(f"guard: out-of-distribution scores fitted on {len(fit)} train images, compared on {len(val_samples)} val "
        f"images vs {sum(map(len, probes.values()))} probes in {len(probes)} families")
    guard = fit_guard(model, spec, [p for p, _ in fit], [p for p, _ in val_samples], probes, o.ood_score, o.ood_accept)
    say(f"guard: {guard.scorer.method} (threshold {guard.threshold:.4g}, {guard.val_acceptance * 100:.1f}% of val accepted)")
    temperature, calibration = choose_temperature(model, meta, spec, val_samples, o.calibrate)
    say(f"calibration: T = {calibration['temperature']:.4f}, {calibration['source']}; val ECE "
        f"{calibration['val']['before']['ece']:.3f} -> {calibration['val']['after']['ece']:.3f}, NLL "
        f"{calibration['val']['before']['nll']:.3f} -> {calibration['val']['after']['nll']:.3f}")
    graph = EdgeGraph(model, guard.scorer.module(), temperature).eval()

    say(f"export: {meta['model_name']} ({len(classes)} classes, {spec.input_size} px) -> {fp32}")
    export_onnx(graph, spec, fp32, output_names=OUTPUT_NAMES)
    calib = stratified(calib_pool, o.calibration_images)
    settings = default_settings(o.calibration_method, o.bias_correction_images, o.gptq_images, o.int8_full_range)
    say(f"quantize: calibrating on {len(calib)} images ({o.calibration_method}) -> {int8.name}")
    candidate = out / ".model.int8.candidate.onnx"
    # batch 1: the histogram calibrators (entropy, percentile) fail on multi-image batches
    diagnostics = quantize(fp32, candidate, [x for x, _ in batches(calib, spec, 1)], settings, log=say)

    n_probes = sum(map(len, probes.values()))
    say(f"verify: PyTorch vs ONNX fp32 vs ONNX int8 on {len(eval_samples)} images of {eval_dir} + {n_probes} probes")
    sessions = {"onnx_fp32": session(fp32, o.threads), "onnx_int8": session(candidate, o.threads),
                "onnx_int8_unfused": reference_session(candidate, o.threads)}
    paths, labels = [p for p, _ in eval_samples], [label for _, label in eval_samples]
    logits, trust, int8_guard, outputs = check_backends(guard, graph, sessions, spec, paths,
                                                        [p for p, _ in val_samples], probes)
    host = detect_cpu()
    static = weight_check(onnx.load(str(candidate)))
    portability = verify_portability(candidate, outputs, int8_guard["threshold"], static, host, paths, spec,
                                     o.emulated_images, portable=not o.int8_full_range, arm64_root=o.arm64_root, log=say)
    skipped = {}  # why -> classes not run under emulation (other than "not covered" / "this CPU")
    for c, e in portability["emulated"].items():
        if not e["run"] and e["why"] != "not covered" and not e["why"].startswith("this CPU"):
            skipped.setdefault(e["why"], []).append(c)
    say(f"int8 CPU classes: covered {', '.join(portability['covered'])}; verified {', '.join(portability['verified']) or 'none'}"
        + "".join(f"; {', '.join(cs)} not run under emulation: {why}" for why, cs in skipped.items()))
    metrics = compare(logits, labels, classes)
    t = calibration["temperature"]  # the graphs' logits are divided by it: times T gives them back un-tempered
    calibration["eval"] = {k: before_after(logits[k] * t, np.array(labels), t) for k in ("pytorch", "onnx_int8")}
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731  reports and metadata travel: no absolute paths
    flips = [f | {"path": rel(f["path"])}
             for f in flipped_images(eval_samples, labels, logits["pytorch"], logits["onnx_int8"], classes)]

    parity = metrics["onnx_fp32"]["max_abs_logit_diff"]
    fp32_trust = trust["backends"]["onnx_fp32"]
    parity_trust = max(fp32_trust["ood_score_max_rel_diff"], fp32_trust["cam_max_rel_diff"])
    drop = (metrics["pytorch"]["accuracy"] - metrics["onnx_int8"]["accuracy"]) * 100
    agreement = metrics["onnx_int8"]["agreement"]
    ood_agreement = trust["backends"]["onnx_int8"]["ood_decision_agreement"]
    parity_ok = parity <= o.parity_tolerance and parity_trust <= o.parity_tolerance
    int8_ok = (drop <= o.max_accuracy_drop and agreement >= o.min_agreement and ood_agreement >= o.min_ood_agreement
               and portability["ok"])
    status = "pass" if int8_ok else ("FAIL, kept by --allow-drop" if o.allow_drop else "FAIL, rejected")
    gate = {"parity_tolerance": o.parity_tolerance, "parity_ok": parity_ok, "parity_trust_max_rel_diff": parity_trust,
            "max_accuracy_drop": o.max_accuracy_drop, "min_agreement": o.min_agreement,
            "accuracy_drop_points": drop, "agreement": agreement, "min_ood_agreement": o.min_ood_agreement,
            "ood_agreement": ood_agreement, "int8_portable": portability["ok"], "int8_ok": int8_ok, "int8_status": status}
    if not int8_ok and o.allow_drop:
        gate["warning"] = (f"int8 failed the gate (drop {drop:.2f} points, agreement {agreement * 100:.2f}%, OOD "
                           f"decisions agree {ood_agreement * 100:.2f}%"
                           + "".join(f"; {p}" for p in portability["problems"]) + ") and was kept because of --allow-drop")

    # the heatmaps' one scale per model file, from its own maps of the val split (export/cam_scale.py)
    cam_scales = {k: cam_scale.measure(sessions[k], [p for p, _ in val_samples], spec, classes)
                  for k in ("onnx_fp32", "onnx_int8")}
    say(cam_scale.summary(cam_scales))
    say(f"latency: batch 1 and 16, {o.threads} threads")
    latency = {"threads": o.threads, "runs": o.latency_runs}
    for name, sess in ((k, sessions[k]) for k in ("onnx_fp32", "onnx_int8")):
        latency[name] = {f"batch_{b}": latency_ms(sess, spec, b, o.latency_runs) for b in (1, 16)}
    latency["speedup_batch_1"] = latency["onnx_fp32"]["batch_1"] / latency["onnx_int8"]["batch_1"]
    latency["speedup_batch_16"] = latency["onnx_fp32"]["batch_16"] / latency["onnx_int8"]["batch_16"]
    del sessions

    # a model that failed its check is never where xray-infer looks for one
    rejected = {fp32: out / "model.rejected.onnx", int8: out / "model.int8.rejected.onnx"}
    for stale in (int8, *rejected.values()):
        stale.unlink(missing_ok=True)
    final_fp32 = fp32 if parity_ok else rejected[fp32]
    final_int8 = int8 if parity_ok and (int8_ok or o.allow_drop) else rejected[int8]
    os.replace(fp32, final_fp32)
    os.replace(candidate, final_int8)
    verification = {"eval_split": rel(eval_dir), "images": len(labels), "parity_max_abs_logit_diff": parity,
                    **{f"{k}_accuracy": v["accuracy"] for k, v in metrics.items()},
                    **{f"{k}_macro_f1": v["macro_f1"] for k, v in metrics.items()},
                    "int8_agreement": agreement, "int8_gate": status, "temperature": temperature or 1.0,
                    "calibration": {"source": calibration["source"], "ece_bins": calibration["ece_bins"],
                                    "val_ece": calibration["val"]["after"]["ece"],
                                    **{f"{k}_ece": v["after"]["ece"] for k, v in calibration["eval"].items()}},
                    "onnxruntime": onnxruntime.__version__}
    info = ModelInfo(classes=classes, spec=spec, model_name=meta["model_name"], checkpoint_sha256=sha,
                     export_date=o.export_date, verification=verification, ood=guard.metadata(),
                     cam_scale=cam_scales["onnx_fp32"])
    set_metadata(final_fp32, info.to_metadata())
    info.precision, info.ood, info.quantization = "int8", int8_guard, settings.to_dict()
    info.cam_scale = cam_scales["onnx_int8"]
    info.int8_cpu_classes = {"covered": portability["covered"], "verified": portability["verified"]}
    set_metadata(final_int8, info.to_metadata())

    files = {"onnx_fp32": final_fp32, "onnx_int8": final_int8}
    report = {"model_name": meta["model_name"], "classes": classes, "checkpoint": rel(o.checkpoint),
              "checkpoint_sha256": sha, "export_date": o.export_date, "temperature": temperature or 1.0, "calibration": calibration,
              "image_spec": spec.to_dict(),
              "eval": {"split": rel(eval_dir), "images": len(labels)}, "metrics": metrics, "gate": gate,
              "int8_flips": flips, "near_tie": NEAR_TIE,
              "latency": latency, "quantization": settings.to_dict() | diagnostics, "onnxruntime": onnxruntime.__version__,
              "int8_cpu_classes": portability, "cam_scale": cam_scales,
              "files": {k: {"path": p.name, "mb": p.stat().st_size / 1e6} for k, p in files.items()},
              "size_ratio": final_int8.stat().st_size / final_fp32.stat().st_size,
              "trust": {"guard": guard.metadata(), "int8_guard": int8_guard, "chosen_by": guard.chosen_by,
                        "methods": guard.comparison,
                        "probe_images_per_family": o.probe_images, **trust}}
    text = write_report(out, report)
    print(text)
    if not parity_ok:
        say(f"error: ONNX fp32 differs from PyTorch by {max(parity, parity_trust):.2e} (> {o.parity_tolerance:g}); "
            f"do not ship it (written as {final_fp32.name} and {final_int8.name})")
        return False
    if not int8_ok and not o.allow_drop:
        say(f"error: int8 failed the gate: accuracy drop {drop:.2f} points (limit {o.max_accuracy_drop:g}), agreement "
            f"{agreement * 100:.2f}% (minimum {o.min_agreement * 100:g}%), OOD decisions agree {ood_agreement * 100:.2f}% "
            f"(minimum {o.min_ood_agreement * 100:g}%)" + "".join(f"; {p}" for p in portability["problems"])
            + f"; kept {fp32.name}, wrote {final_int8.name}")
        return False
    if gate.get("warning"):
        say("WARNING: " + gate["warning"])
    say(f"exported: {fp32} and {final_int8}; report: {out / 'export_report.md'}")
    return True
