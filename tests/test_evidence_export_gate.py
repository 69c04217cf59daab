"""xray-export's gate at its default thresholds, each rule on its own, and the fp32 parity failure.

Every other passing export in the tests loosens the gate; here one export passes with the defaults (a
confident model, the default calibration), one fails on the accuracy-drop rule alone and one on the
agreement rule alone (a deliberately bad calibration: one image, no GPTQ, no bias correction)."""
from __future__ import annotations

import json
import sys

import pytest
from conftest import INFER, ROOT, run_command, xray_export

from xray.common.errors import XrayError
from xray.infer.model import resolve_model_path

FAST = ["--threads", "2", "--latency-runs", "3"]  # nothing that changes what is exported or how it is judged
BAD_CALIBRATION = ["--calibration-images", 1, "--gptq-images", 0, "--bias-correction-images", 0]


def report(out):
    return json.loads((out / "export_report.json").read_text())


@pytest.fixture(scope="module")
def confident(run, tmp_path_factory):
    """Lite0 at 64 px on the shared split, its head trained to convergence (val macro-F1 1.0 here): no image
    is near a tie, so int8 has no excuse to flip one."""
    base = tmp_path_factory.mktemp("confident")
    args = ["--data-dir", run.parent / "data", "--output-dir", base, "--run-name", "c", "--image-size", 64,
            "--batch-size", 16, "--workers", 0, "--phases", "A", "--epochs-a", 25, "--lr-a", 1e-2, "--no-augment",
            "--cache-features", "--patience", 0]
    run_command([sys.executable, ROOT / "train" / "main.py", *args])
    return base / "c"


def test_default_gate_passes_a_model_that_quantizes_well(confident):
    proc = xray_export(confident, *FAST, "--eval-split", "val", check=False)
    out = confident / "export"
    gate = report(out)["gate"]
    assert proc.returncode == 0, (gate, proc.stderr[-2000:])
    assert (gate["max_accuracy_drop"], gate["min_agreement"], gate["parity_tolerance"]) == (1.0, 0.98, 1e-3)
    assert gate["int8_ok"] and gate["parity_ok"] and gate["int8_status"] == "pass"
    assert gate["accuracy_drop_points"] <= 1.0 and gate["agreement"] >= 0.98
    assert (out / "model.int8.onnx").is_file() and not (out / "model.int8.rejected.onnx").exists()


def rejected(out, proc):
    gate = report(out)["gate"]
    assert proc.returncode == 1, (gate, proc.stderr[-2000:])
    assert "int8 failed the gate" in proc.stderr and "Traceback" not in proc.stderr
    assert gate["int8_ok"] is False and gate["int8_status"] == "FAIL, rejected" and gate["parity_ok"]
    assert (out / "model.onnx").is_file() and (out / "model.int8.rejected.onnx").is_file()
    assert not (out / "model.int8.onnx").exists()
    return gate


def test_accuracy_drop_rule_alone_rejects(run, tmp_path):
    """Calibrated on flat gray pictures: every activation range is far too narrow, so int8 loses tens of points
    (one calibration film was not enough once the weights became 7-bit: its flips went both ways)."""
    from PIL import Image

    flat = tmp_path / "flat"
    for name in json.loads((run / "best.json").read_text())["classes"]:
        (flat / name).mkdir(parents=True)
        Image.new("L", (64, 64), 128).save(flat / name / "gray.png")
    out = tmp_path / "drop"
    proc = xray_export(run, *FAST, *BAD_CALIBRATION, "--calibration-dir", flat, "--eval-split", "train",
                       "--output-dir", out, "--min-agreement", 0, "--min-ood-agreement", 0, check=False)
    gate = rejected(out, proc)
    assert gate["max_accuracy_drop"] == 1.0 and gate["min_agreement"] == 0 and gate["min_ood_agreement"] == 0
    assert gate["accuracy_drop_points"] > 1.0 and gate["int8_portable"], gate


def test_agreement_rule_alone_rejects(run, tmp_path):
    out = tmp_path / "agreement"
    proc = xray_export(run, *FAST, *BAD_CALIBRATION, "--eval-split", "train", "--output-dir", out,
                       "--max-accuracy-drop", 100, check=False)
    gate = rejected(out, proc)
    assert gate["min_agreement"] == 0.98 and gate["max_accuracy_drop"] == 100
    assert gate["agreement"] < 0.98 and gate["accuracy_drop_points"] <= 100, gate


def test_fp32_parity_failure_ships_no_model(run, tmp_path, monkeypatch):
    """--parity-tolerance 0: the fp32 model differs from PyTorch (by float rounding), so nothing may be left
    where xray-infer looks for a model: both files are written as *.rejected.onnx."""
    out = tmp_path / "runs" / "r" / "export"
    proc = xray_export(run, *FAST, "--gptq-images", 16, "--bias-correction-images", 16, "--eval-split", "val",
                       "--output-dir", out, "--parity-tolerance", 0, "--min-agreement", 0, "--max-accuracy-drop", 100,
                       check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ONNX fp32 differs from PyTorch" in proc.stderr and "do not ship it" in proc.stderr
    assert "Traceback" not in proc.stderr
    r = report(out)
    assert r["gate"]["parity_ok"] is False and r["metrics"]["onnx_fp32"]["max_abs_logit_diff"] > 0
    assert not (out / "model.onnx").exists() and not (out / "model.int8.onnx").exists()
    assert (out / "model.rejected.onnx").is_file() and (out / "model.int8.rejected.onnx").is_file()
    monkeypatch.delenv("XRAY_MODEL", raising=False)
    with pytest.raises(XrayError, match="no model"):
        resolve_model_path(None, cwd=tmp_path)
    image = next((run.parent / "data" / "test" / "NORMAL").iterdir())
    proc = run_command(INFER + [image], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no model" in proc.stderr
