#!/usr/bin/env python
"""int8 on other CPUs: each quantization option's accuracy and agreement with PyTorch natively and on an
emulated AVX2 CPU (qemu-x86_64 -cpu Haswell: no VNNI), and its native latency at batch 1 and 16.

    python scripts/bench_int8_cpus.py runs/demo                       # after make demo
    python scripts/bench_int8_cpus.py runs/demo --emulated-images 30 --json bench_int8.json

Measured in one run, with the project's own code, on the run's shipped fp32 graph (runs/<run>/export/model.onnx,
with its out-of-distribution score and heatmap outputs):

- options: xray.export.quantize.quantize with default_settings() (portable: 7-bit matrix weights, 8-bit
  depthwise), default_settings(full_range=True) (--int8-full-range), 7-bit depthwise weights too, and U8U8
  (uint8 weights, full range), each calibrated as xray-export does (stratified train images, GPTQ, bias
  correction);
- PyTorch: the checkpoint's model on the same preprocessed test images (classes by argmax);
- native: onnxruntime's default (fused int8) session on every test image; emulated: the same model on an evenly
  spread subset under qemu (xray.export.emulate), compared with the native run of the same images;
- covered: xray.export.portability.weight_check; kernel error ratio: fused vs onnxruntime's unfused reference
  of the same graph, relative to quantization's own error (exact kernels < 1);
- guard flags: images whose ood_score is over the fp32 model's threshold (one threshold for every option);
- latency: xray.export.verify.latency_ms in interleaved blocks (bench_export.interleaved), fp32 included.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import calibration_batches, interleaved  # noqa: E402

from xray.common.cpu import cpu_model, detect_cpu  # noqa: E402
from xray.common.errors import XrayError, exit_on_user_error  # noqa: E402
from xray.common.model_meta import ModelInfo  # noqa: E402
from xray.export.emulate import emulator, run_emulated  # noqa: E402
from xray.export.portability import kernel_agreement, reference_session, weight_check  # noqa: E402
from xray.export.quantize import QuantSettings, default_settings, quantize  # noqa: E402
from xray.export.verify import file_batches, latency_ms, session, stratified  # noqa: E402
from xray.train.checkpoint import load_checkpoint  # noqa: E402
from xray.train.data import scan_split  # noqa: E402


def options() -> dict[str, QuantSettings]:
    full = default_settings(full_range=True)
    seven_bit_dw = default_settings()
    seven_bit_dw.full_range_depthwise = False
    u8u8 = default_settings(full_range=True)
    u8u8.weight_type = "uint8"
    return {"portable (default)": default_settings(), "full range (--int8-full-range)": full,
            "7-bit depthwise too": seven_bit_dw, "U8U8 (uint8 weights)": u8u8}


def run_all(sess: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate(p) for p in zip(*parts)]


def row(outputs, labels, torch_pred, threshold) -> dict:
    pred = outputs[0].argmax(1)
    return {"images": len(pred), "accuracy": float((pred == labels).mean()),
            "agreement_with_pytorch": float((pred == torch_pred).mean()),
            "guard_flags": int((outputs[1] > threshold).sum()) if len(outputs) > 1 else None}


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--images", default=0, show_default=True, help="Test images (stratified; 0: all).")
@click.option("--emulated-images", default=30, show_default=True, type=click.IntRange(0))
@click.option("--calibration-images", default=300, show_default=True, type=click.IntRange(1))
@click.option("--runs", default=30, show_default=True, type=click.IntRange(1), help="Timed runs per latency.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@exit_on_user_error
def main(run_dir, images, emulated_images, calibration_images, runs, threads, json_path):
    fp32_path = run_dir / "export" / "model.onnx"
    if not fp32_path.is_file():
        raise XrayError(f"{fp32_path}: not found; run xray-export {run_dir} first")
    model, meta = load_checkpoint(run_dir / "best.safetensors")
    model.eval()
    classes, spec = meta["classes"], meta["image_spec"]
    data = Path(meta["config"]["data_dir"])
    test = scan_split(data / "test", classes)[1]
    test = stratified(test, images) if images else test
    calib = stratified(scan_split(data / "train", classes)[1], calibration_images)
    x = np.concatenate(list(file_batches([p for p, _ in test], spec)))
    labels = np.array([label for _, label in test])
    with torch.no_grad():
        torch_pred = np.concatenate([model(torch.from_numpy(x[i:i + 32])).numpy() for i in range(0, len(x), 32)]).argmax(1)
    info = ModelInfo.from_metadata(ort.InferenceSession(str(fp32_path)).get_modelmeta().custom_metadata_map)
    threshold = float(info.ood.get("threshold", np.inf))
    sub = np.unique(np.linspace(0, len(x) - 1, min(emulated_images, len(x))).astype(int))
    qemu = emulated_images and not isinstance(emulator("avx2"), str)
    if emulated_images and not qemu:
        print(f"note: {emulator('avx2')}: no emulated AVX2 figures", file=sys.stderr)

    fp32 = run_all(session(fp32_path, threads), x)
    results = {"cpu": cpu_model(), "cpu_class": detect_cpu().describe(), "onnxruntime": ort.__version__,
               "test_images": len(x), "emulated_images": len(sub) if qemu else 0, "threads": threads,
               "fp32": {"native": row(fp32, labels, torch_pred, threshold)}, "options": {}}
    sessions = {"fp32": session(fp32_path, threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in options().items():
            print(f"quantize: {name}", file=sys.stderr, flush=True)
            path = Path(tmp) / f"{len(sessions)}.onnx"
            quantize(fp32_path, path, calibration_batches(calib, spec, 1), settings,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
            sess = session(path, threads)
            native = run_all(sess, x)
            reference = run_all(reference_session(path, threads), x)
            r = {"covered": weight_check(onnx.load(str(path)))["covered"],
                 "settings": settings.to_dict(), "native": row(native, labels, torch_pred, threshold),
                 "native_vs_reference": kernel_agreement(native, reference, fp32, threshold)}
            if qemu:
                print(f"emulate: {name} on {len(sub)} images under qemu -cpu Haswell", file=sys.stderr, flush=True)
                emulated, seen = run_emulated(path, x[sub], "avx2", threads)
                r["emulated_avx2"] = row(emulated, labels[sub], torch_pred[sub], threshold) | {
                    "cpu_class_seen": seen,
                    "class_agreement_with_native": float((emulated[0].argmax(1) == native[0][sub].argmax(1)).mean()),
                    "max_abs_logit_diff_vs_native": float(np.abs(emulated[0] - native[0][sub]).max()),
                    "native_subset": row([o[sub] for o in native], labels[sub], torch_pred[sub], threshold),
                    "vs_reference": kernel_agreement(emulated, [o[sub] for o in reference], [o[sub] for o in fp32],
                                                     threshold)}
            results["options"][name] = r
            sessions[name] = sess
        print("latency: batch 1 and 16, interleaved blocks", file=sys.stderr, flush=True)
        for b in (1, 16):
            timers = {n: (lambda r_, w, s=s, b=b: latency_ms(s, spec, b, r_, w)) for n, s in sessions.items()}
            samples = interleaved(timers, runs, 3, 5, 0.2)
            for n, v in samples.items():
                target = results["fp32"] if n == "fp32" else results["options"][n]
                target.setdefault("latency_ms", {})[f"batch_{b}"] = float(np.median(v))
    text = markdown(results)
    print(text)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))


def markdown(r: dict) -> str:
    lines = [f"# int8 options on {r['cpu']} ({r['cpu_class']}), onnxruntime {r['onnxruntime']}, {r['threads']} threads",
             "", f"{r['test_images']} test images natively; {r['emulated_images']} of them under qemu-x86_64 -cpu Haswell "
             "(AVX2, no VNNI). Agreement = same class as PyTorch. Guard flags: ood_score over the fp32 threshold.", "",
             "| option | covered | native acc | native agree | native flags | AVX2 acc | AVX2 agree | AVX2 = native "
             "| AVX2 flags (native) | kernel ratio native / AVX2 | b1 ms | b16 ms | b1 vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = r["fp32"]
    lines.append(f"| fp32 | all | {f['native']['accuracy'] * 100:.1f}% | {f['native']['agreement_with_pytorch'] * 100:.1f}% "
                 f"| {f['native']['guard_flags']} | | | | | | {f['latency_ms']['batch_1']:.2f} | "
                 f"{f['latency_ms']['batch_16']:.1f} | 1.00x |")
    for name, o in r["options"].items():
        n, e = o["native"], o.get("emulated_avx2")
        cov = "all" if len(o["covered"]) == 7 else ", ".join(o["covered"])
        emu = (f"{e['accuracy'] * 100:.1f}% | {e['agreement_with_pytorch'] * 100:.1f}% | "
               f"{e['class_agreement_with_native'] * 100:.0f}% | {e['guard_flags']} ({e['native_subset']['guard_flags']}) | "
               f"{o['native_vs_reference']['kernel_error_ratio']:.2f} / {e['vs_reference']['kernel_error_ratio']:.2f}"
               if e else f"– | – | – | – | {o['native_vs_reference']['kernel_error_ratio']:.2f} / –")
        lines.append(f"| {name} | {cov} | {n['accuracy'] * 100:.1f}% | {n['agreement_with_pytorch'] * 100:.1f}% | "
                     f"{n['guard_flags']} | {emu} | {o['latency_ms']['batch_1']:.2f} | {o['latency_ms']['batch_16']:.1f} | "
                     f"{f['latency_ms']['batch_1'] / o['latency_ms']['batch_1']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
