"""xray-export through its real CLI: artifacts, self-describing models, parity, the int8 gate, errors."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import QUICK, ROOT, xray_export
from PIL import Image

from xray.common.artifacts import sha256_file
from xray.common.model_meta import ModelInfo
from xray.export.onnx_export import export_onnx
from xray.train.checkpoint import read_sidecar
from xray.train.models import REGISTRY, build_model

def onnx_metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_writes_verified_self_describing_models(run, exported):
    out, proc = exported
    for name in ("model.onnx", "model.int8.onnx", "export_report.json", "export_report.md"):
        assert (out / name).is_file(), name
    assert not (out / "model.int8.rejected.onnx").exists()
    assert "## Verification" in proc.stdout
    sidecar = read_sidecar(run / "best.safetensors")
    for name, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8")):
        onnx.checker.check_model(onnx.load(str(out / name)), full_check=True)
        info = ModelInfo.from_metadata(onnx_metadata(out / name))
        assert info.spec == sidecar["image_spec"] and info.classes == sidecar["classes"]
        assert info.checkpoint_sha256 == sha256_file(run / "best.safetensors")
        assert info.precision == precision and info.model_name == "efficientnet_lite0"
        assert info.verification["images"] > 0 and "onnx_int8_accuracy" in info.verification
        assert info.verification["onnxruntime"] == ort.__version__  # xray-infer warns when its own differs
    report = json.loads((out / "export_report.json").read_text())
    assert report["metrics"]["onnx_fp32"]["max_abs_logit_diff"] <= 1e-3
    assert report["gate"]["parity_ok"] and report["gate"]["int8_ok"]
    assert set(report["metrics"]) == {"pytorch", "onnx_fp32", "onnx_int8", "onnx_int8_unfused"}
    assert report["size_ratio"] <= 0.30, "int8 file must be at most 30 % of fp32"
    for name in ("onnx_fp32", "onnx_int8"):
        lat = report["latency"][name]
        assert lat["batch_16"] > lat["batch_1"] > 0, f"{name}: 16 images must take longer than one ({lat})"
    assert report["quantization"]["per_channel"] and report["quantization"]["quant_format"] == "QDQ"


def test_default_int8_is_portable_and_verified_on_this_cpu_and_emulated_avx2(exported):
    """7-bit matrix weights whatever CPU exports: covered on every class; verified here and, through
    qemu-x86_64 -cpu Haswell (make test installs qemu-user), on AVX2 kernels."""
    from xray.common.cpu import CPU_CLASSES, detect_cpu

    out, proc = exported
    info = ModelInfo.from_metadata(onnx_metadata(out / "model.int8.onnx"))
    assert info.quantization["reduce_range"] is True and info.quantization["weight_type"] == "int8"
    assert info.int8_cpu_classes["covered"] == list(CPU_CLASSES)
    host = detect_cpu().cls
    assert host in info.int8_cpu_classes["verified"] and "avx2" in info.int8_cpu_classes["verified"]
    fp32_meta = onnx_metadata(out / "model.onnx")
    assert "xray.quantization" not in fp32_meta and "xray.int8_cpu_classes" not in fp32_meta
    p = json.loads((out / "export_report.json").read_text())["int8_cpu_classes"]
    assert p["ok"] and not p["problems"] and p["static"]["u8s8_matrix_max_abs_weight"] <= 64
    assert p["native"]["agrees"] and p["native"]["kernel_error_ratio"] < 1
    if host != "avx2":
        e = p["emulated"]["avx2"]
        assert e["run"] and e["cpu_class_seen"] == "avx2" and e["agrees"] and 0 < e["images"] <= 16
    text = (out / "export_report.md").read_text()
    assert "## int8 on other CPUs" in text and "**covered** (right by construction): avx2, avx512" in text
    assert f"verified {', '.join(info.int8_cpu_classes['verified'])}" in proc.stderr


def test_export_report_and_metadata_name_no_absolute_path(exported):
    """The report and the models travel (to a colleague, a regulator, an edge box): every path in them is relative
    to the export folder, and resolves from there."""
    import os

    out, _ = exported
    texts = [(out / n).read_text() for n in ("export_report.md", "export_report.json")]
    texts += [json.dumps(onnx_metadata(out / n)) for n in ("model.onnx", "model.int8.onnx")]
    machine = {str(p) for p in (Path.home(), Path("/tmp"), Path.cwd(), out.resolve(), Path(os.sep) / "root")}
    for text in texts:
        assert not [m for m in machine if m in text], [m for m in machine if m in text]
    report = json.loads(texts[1])
    assert (out / report["checkpoint"]).resolve() == (out.parent / "best.safetensors").resolve()
    assert (out / report["eval"]["split"]).is_dir()


def test_int8_full_range_is_opt_in_and_covered_only_where_it_cannot_saturate(run, tmp_path):
    """--int8-full-range: 8-bit weights, covered where no kernel saturates, and with --arm64-root (make test builds
    one) verified on emulated Arm with and without dot product."""
    from xray.common.cpu import CPU_CLASSES, SATURATING_CLASSES

    out = tmp_path / "full"
    proc = xray_export(run, *QUICK, "--output-dir", out, "--eval-split", "val", "--min-agreement", 0.5,
                       "--max-accuracy-drop", 50, "--int8-full-range", "--allow-drop", "--emulated-images", 6,
                       "--arm64-root", ROOT / ".venv" / "arm64")
    info = ModelInfo.from_metadata(onnx_metadata(out / "model.int8.onnx"))
    assert info.quantization["reduce_range"] is False
    assert info.int8_cpu_classes["covered"] == [c for c in CPU_CLASSES if c not in SATURATING_CLASSES]
    assert "avx2" not in info.int8_cpu_classes["verified"]
    assert {"arm64", "arm64_dotprod"} <= set(info.int8_cpu_classes["verified"])
    p = json.loads((out / "export_report.json").read_text())["int8_cpu_classes"]
    assert p["static"]["u8s8_matrix_max_abs_weight"] > 64 and p["emulated"]["avx2"] == {"run": False, "why": "not covered"}
    assert p["emulated"]["arm64"]["qemu"] == "qemu-aarch64 -cpu cortex-a72" and p["emulated"]["arm64"]["images"] == 6
    assert "covered avx512_vnni, avx_vnni, amx, arm64, arm64_dotprod" in proc.stderr
    assert "| qemu-aarch64 -cpu neoverse-n1 | arm64_dotprod | 6 |" in (out / "export_report.md").read_text()


def test_dynamic_batch_and_fixed_size(exported):
    out, _ = exported
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert shape[1:] == [3, 64, 64] and not isinstance(shape[0], int)
    for n in (1, 5):
        assert sess.run(None, {"input": np.zeros((n, 3, 64, 64), np.float32)})[0].shape == (n, 3)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_fp32_onnx_matches_pytorch_for_every_registry_model(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 3, pretrained=False).eval()
    spec = REGISTRY[name].spec.with_size(64)
    x = torch.randn(4, spec.channels, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    export_onnx(model, spec, tmp_path / "m.onnx")
    assert not any(isinstance(m, torch.nn.ZeroPad2d) for m in model.modules()), "export modified the model"
    with torch.no_grad():
        assert torch.equal(model(x), torch.from_numpy(ref)), "export must not modify the reference model"
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())


def blank_calibration_set(root, classes):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (64, 64), 0).save(root / c / f"blank{i}.png")
    return root


def test_broken_quantization_is_caught_by_the_gate(run, exported, tmp_path):
    classes = read_sidecar(run / "best.safetensors")["classes"]
    blank = blank_calibration_set(tmp_path / "blank", classes)
    out = tmp_path / "out"
    proc = xray_export(run, *QUICK, "--eval-split", "val", "--calibration-dir", blank, "--output-dir", out, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "int8 failed the gate" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "model.onnx").is_file() and (out / "model.int8.rejected.onnx").is_file()
    assert not (out / "model.int8.onnx").exists()
    report = json.loads((out / "export_report.json").read_text())
    good = json.loads((exported[0] / "export_report.json").read_text())
    assert report["gate"]["int8_status"] == "FAIL, rejected"
    assert report["gate"]["agreement"] < good["gate"]["agreement"]
    flips, m = report["int8_flips"], report["metrics"]["onnx_int8"]
    assert len(flips) == m["flips"] == round((1 - m["agreement"]) * report["eval"]["images"]) > 0
    assert all(f["pytorch"] != f["int8"] and f["label"] in classes for f in flips)
    assert [f["pytorch_top2_gap"] for f in flips] == sorted((f["pytorch_top2_gap"] for f in flips), reverse=True)
    assert m["flips_near_tie"] == sum(f["pytorch_top2_gap"] < report["near_tie"] for f in flips)
    markdown = (out / "export_report.md").read_text()
    assert "Images int8 classifies differently" in markdown and Path(flips[0]["path"]).name in markdown

    kept = tmp_path / "kept"
    proc = xray_export(run, *QUICK, "--eval-split", "val", "--calibration-dir", blank, "--output-dir", kept,
                       "--allow-drop")
    assert "WARNING" in proc.stderr and (kept / "model.int8.onnx").is_file()
    assert "WARNING" in (kept / "export_report.md").read_text()


def test_bad_input(run, tmp_path):
    def fails(*args, message):
        proc = xray_export(*args, check=False)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]

    fails(message="give a run folder")
    fails(tmp_path / "missing", message="no such run folder")
    fails("--checkpoint", tmp_path / "none.safetensors", message="no such checkpoint")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in ("best.safetensors", "best.json"):
        (tampered / f).write_bytes((run / f).read_bytes())
    with open(tampered / "best.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    fails(tampered, message="do not match their sidecar")
    side = json.loads((run / "best.json").read_text())
    side["model_name"] = "vgg16"
    (tampered / "best.json").write_text(json.dumps(side))
    (tampered / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes())
    fails(tampered, message="unknown model")


def test_help():
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "xray-export"), "--help"], capture_output=True, text=True)
    if proc.returncode != 0:  # not in the project venv: call the module
        proc = xray_export("--help")
    assert "--max-accuracy-drop" in proc.stdout and "--allow-drop" in proc.stdout


def test_histogram_calibration_methods_run(run, tmp_path):
    xray_export(run, *QUICK, "--eval-split", "val", "--output-dir", tmp_path, "--calibration-method", "entropy",
                "--calibration-images", 12, "--min-agreement", 0, "--max-accuracy-drop", 100)
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["quantization"]["method"] == "entropy" and report["quantization"]["calibration_images"] == 12


def _lite0_onnx(tmp_path, size=64):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, pretrained=True).eval()
    spec = REGISTRY["efficientnet_lite0"].spec.with_size(size)
    export_onnx(model, spec, tmp_path / "fp32.onnx")
    return tmp_path / "fp32.onnx"


def _weights_range(path, names):
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    return {n: int(np.abs(inits[n].astype(np.int32)).max()) for n in names if n in inits}


def test_depthwise_weights_keep_8_bits_and_bias_correction_recentres_logits(tmp_path, synthetic_raw):
    """reduce_range (no VNNI) spares depthwise convs; sequential bias correction removes the mean logit shift."""
    from xray.common.imageio import load_image
    from xray.common.preprocess import preprocess
    from xray.export.quantize import QuantSettings, depthwise_weights, quantize

    fp32 = _lite0_onnx(tmp_path)
    spec = REGISTRY["efficientnet_lite0"].spec.with_size(64)
    files = sorted(synthetic_raw.rglob("*.png"))[:48]
    x = np.stack([preprocess(load_image(f), spec) for f in files])
    plain = QuantSettings(reduce_range=True, full_range_depthwise=False, bias_correction_images=0, gptq_images=0)
    tuned = QuantSettings(reduce_range=True, full_range_depthwise=True, bias_correction_images=16, gptq_images=0)
    quantize(fp32, tmp_path / "plain.onnx", [b[None] for b in x[:32]], plain)
    quantize(fp32, tmp_path / "tuned.onnx", [b[None] for b in x[:32]], tuned)

    dw = depthwise_weights(tmp_path / "fp32.onnx")
    assert len(dw) >= 10
    q = {d + "_quantized" for d in dw}
    plain_max, tuned_max = _weights_range(tmp_path / "plain.onnx", q), _weights_range(tmp_path / "tuned.onnx", q)
    assert plain_max and max(plain_max.values()) <= 64 < min(tuned_max.values()), (plain_max, tuned_max)

    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    shift = {}
    for name in ("plain", "tuned"):
        got = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]
        shift[name] = np.abs((got - ref).mean(axis=0)).max()
    assert shift["tuned"] < 0.5 * shift["plain"], shift


def test_gptq_brings_int8_logits_closer_to_fp32_and_keeps_the_integer_ranges(tmp_path, synthetic_raw):
    """Same scales and ranges as round-to-nearest (7-bit stays 7-bit), lower layer and logit error on held-out images."""
    from onnx import numpy_helper

    from xray.common.imageio import load_image
    from xray.common.preprocess import preprocess
    from xray.export.quantize import QuantSettings, quantize

    fp32 = _lite0_onnx(tmp_path)
    spec = REGISTRY["efficientnet_lite0"].spec.with_size(64)
    files = sorted(synthetic_raw.rglob("*.png"))
    x = np.stack([preprocess(load_image(f), spec) for f in files[:32] + files[-32:]])
    calibration, held_out = x[::2], x[1::2]
    nearest = QuantSettings(reduce_range=True, bias_correction_images=0, gptq_images=0)
    gptq = QuantSettings(reduce_range=True, bias_correction_images=0, gptq_images=32)
    quantize(fp32, tmp_path / "nearest.onnx", [b[None] for b in calibration], nearest)
    diagnostics = quantize(fp32, tmp_path / "gptq.onnx", [b[None] for b in calibration], gptq)
    assert diagnostics["gptq_layers"] >= 40 and diagnostics["gptq_output_error_ratio_median"] < 0.7, diagnostics

    def ints(path):
        m = onnx.load(str(path))
        return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer
                if i.name.endswith("_quantized") and numpy_helper.to_array(i).dtype == np.int8}

    a, b = ints(tmp_path / "nearest.onnx"), ints(tmp_path / "gptq.onnx")
    assert a.keys() == b.keys() and len(a) >= 40
    for name in a:
        assert np.abs(b[name].astype(int)).max() <= np.abs(a[name].astype(int)).max(), name
    moved = np.concatenate([np.abs(b[n].astype(int) - a[n].astype(int)).ravel() for n in a])
    assert 0.05 < np.mean(moved > 0) and moved.max() == 1, np.bincount(moved)  # rounded the other way, nothing else

    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": held_out})[0]
    error = {}
    for name in ("nearest", "gptq"):
        got = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": held_out})[0]
        error[name] = float(np.abs(got - ref).mean())
    assert error["gptq"] < 0.8 * error["nearest"], error


def test_calibrated_by_default_and_no_calibrate_leaves_t_1_with_the_guard_untouched(run, tmp_path):
    """A deliberately over-confident model (the trained head's logits x 8): the default export fits T > 1 on val
    and its test ECE falls, for PyTorch and int8; --no-calibrate exports T = 1; the guard's thresholds and
    scores are the same in both graphs (the OOD score never sees T)."""
    from xray.train.checkpoint import load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(run / "best.safetensors")
    meta = json.loads((run / "best.json").read_text())
    with torch.no_grad():
        model.head[1].weight.mul_(8)
        model.head[1].bias.mul_(8)
    meta.pop("temperature", None)
    save_checkpoint(tmp_path / "sharp.safetensors", model, meta)
    outs = {}
    for name, extra in (("calibrated", []), ("raw", ["--no-calibrate"])):
        outs[name] = tmp_path / name
        proc = xray_export("--checkpoint", tmp_path / "sharp.safetensors", *QUICK, "--output-dir", outs[name],
                           "--eval-split", "test", "--min-agreement", 0.5, "--max-accuracy-drop", 50,
                           "--emulated-images", 0, *extra)
        assert "calibration: T = " in proc.stderr
    cal = json.loads((outs["calibrated"] / "export_report.json").read_text())["calibration"]
    raw = json.loads((outs["raw"] / "export_report.json").read_text())["calibration"]
    assert cal["temperature"] > 1.5 and "fitted by xray-export" in cal["source"] and cal["ece_bins"] == 15
    for backend in ("pytorch", "onnx_int8"):  # held out: the test split, T was fitted on val
        q = cal["eval"][backend]
        assert q["after"]["ece"] < q["before"]["ece"] and q["after"]["nll"] < q["before"]["nll"], (backend, q)
    assert raw["temperature"] == 1.0 and raw["eval"]["pytorch"]["after"] == raw["eval"]["pytorch"]["before"]
    assert "## Calibration" in (outs["calibrated"] / "export_report.md").read_text()

    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    for file in ("model.onnx", "model.int8.onnx"):
        metas = [ModelInfo.from_metadata(onnx_metadata(outs[n] / file)) for n in ("calibrated", "raw")]
        assert metas[0].ood["threshold"] == metas[1].ood["threshold"]
        assert metas[0].verification["temperature"] == cal["temperature"] and metas[1].verification["temperature"] == 1
        got = [ort.InferenceSession(str(outs[n] / file), providers=["CPUExecutionProvider"]).run(None, {"input": x})
               for n in ("calibrated", "raw")]
        if file == "model.onnx":
            np.testing.assert_allclose(got[0][1], got[1][1], rtol=1e-5)  # ood_score: the same
            np.testing.assert_allclose(got[0][0] * cal["temperature"], got[1][0], rtol=1e-4, atol=1e-4)
