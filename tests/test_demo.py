"""`make demo`'s script at tiny size: the real CLIs chained (accelerate launch, xray-export, xray-infer)."""
from __future__ import annotations

import json
import sys

import onnx
import pytest
from conftest import ROOT, run_command, xray_infer

from xray.common.artifacts import sha256_file

TINY = ["--per-class", 16, "--synthetic-size", 96, "--image-size", 64, "--epochs-a", 1, "--epochs-b", 1]


def demo(base, *extra):
    return run_command([sys.executable, ROOT / "scripts" / "demo.py", "--data-dir", base / "data",
                        "--runs-dir", base / "runs", *TINY, *extra])


@pytest.mark.slow
def test_demo_chains_the_real_commands(tmp_path):
    first = demo(tmp_path)
    assert "SYNTHETIC" in first.stderr and "accelerate launch" in first.stderr
    run = tmp_path / "runs" / "demo"
    export = run / "export"
    for path in (run / "best.safetensors", run / "metrics.json", export / "model.onnx", export / "export_report.json",
                 run / "test_predictions.csv"):
        assert path.exists(), path
    assert "(missing)" not in first.stdout and "demo done" in first.stderr
    t = json.loads((export / "export_report.json").read_text())["calibration"]["temperature"]
    assert f"calibration: T = {t:.3f} (fitted by xray-export on the val split" in first.stderr  # calibrated by default

    int8 = export / "model.int8.onnx"
    if not int8.exists():  # a 1+1-epoch model may fail the int8 gate; the rejected file is what it measured
        int8 = export / "model.int8.rejected.onnx"
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert meta["xray.checkpoint_sha256"] == sha256_file(run / "best.safetensors")

    report = json.loads((export / "export_report.json").read_text())
    assert report["eval"]["split"].endswith("test")
    doc = json.loads(xray_infer("-m", int8, tmp_path / "data" / "test", "--eval", "-f", "json").stdout)
    n = doc["metrics"]["num_samples"]
    assert n == report["eval"]["images"]
    assert abs(doc["metrics"]["accuracy"] - report["metrics"]["onnx_int8"]["accuracy"]) <= 1 / n + 1e-9

    again = demo(tmp_path)  # everything reused
    for what in ("split: reusing", "train: reusing", "export: reusing"):
        assert what in again.stderr, what
    assert "REMINDER: the data is SYNTHETIC" in again.stderr
