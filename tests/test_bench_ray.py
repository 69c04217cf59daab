"""scripts/bench_ray.py end to end on a tiny setting: 12 real-size files (4 rendered), the 64 px test model, a Ray
head of its own, the local engine and both ray runs; its table, its correctness check and its memory figures."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import psutil

from conftest import SCRIPTS, run_command

ROWS = ("| local (`--engine local`) |", "| ray (joined head) |", "| ray (started by the CLI) |",
        "| ratio ray (joined head) / local |", "| ratio ray (started by the CLI) / local |",
        "| Ray processes, idle (summed RSS) |", "| Ray processes, peak during the job (summed RSS) |",
        "| Ray processes, peak - idle |", "| Ray processes, idle after the job (summed RSS) |",
        "| driver peak RSS (joined head) |", "| max abs prob diff, ray vs local |")


def test_bench_ray_tiny(tiny_onnx, tmp_path):
    path = tiny_onnx[0]
    figures = tmp_path / "bench.json"
    proc = run_command([sys.executable, SCRIPTS / "bench_ray.py", "--model", path, "--precision", "fp32",
                        "--files", 12, "--distinct", 4, "--settle", 2, "--workdir", tmp_path / "work",
                        "--json", figures], env={"RAY_USAGE_STATS_ENABLED": "0"}, timeout=300)
    out = proc.stdout
    assert "Ray vs local bench: " in out and "int8 dot product" in out
    for row in ROWS:
        assert row in out, f"{row} missing from\n{out}"
    res = json.loads(figures.read_text())
    assert res["files"] == 12 and res["images"]["distinct"] == 4
    assert res["check"]["ray_vs_local"] <= 1e-6 and res["check"]["ray_cli_vs_local"] <= 1e-6
    assert res["check"]["ray_copies"] <= 1e-6
    diff = next(line for line in out.splitlines() if line.startswith("| max abs prob diff, ray vs local |"))
    assert float(diff.split("|")[2]) <= 1e-6
    mem = res["memory"]
    for key in ("idle_rss_mb", "peak_rss_mb", "after_rss_mb", "driver_peak_rss_mb", "idle_pss_mb", "peak_pss_mb"):
        assert isinstance(mem[key], float) and math.isfinite(mem[key]) and mem[key] > 0, (key, mem[key])
    assert mem["peak_rss_mb"] >= mem["idle_rss_mb"] and mem["peak_processes"] > mem["idle_processes"] > 0
    assert "raylet" in mem["idle_by_label"] and "gcs_server" in mem["idle_by_label"]
    for run in ("local", "ray_joined", "ray_cli"):
        r = res[run]
        assert r["exit"] == 0 and r["wall_s"] > 0 and r["driver_cpu_s"] > 0 and r["driver_peak_rss_mb"] > 0
    for run in ("ray_joined", "ray_cli"):
        assert res[run]["summary_files"] == 12 and res[run]["summary_per_s"] > 0 and res[run]["ray_cpu_s"] > 0
        assert any(k.startswith("ray::MapWorker") for k in res[run]["cpu_by_label"]), res[run]["cpu_by_label"]
    assert res["ray_cli"]["ray_peak_rss_mb"] > 0
    assert "Where the CPU time goes" in out and "xray-infer (driver)" in out
    head = res["head"]  # stopped, and its temp dir removed
    assert not Path(head["temp_dir"]).exists()
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"])
            if any(head["address"] in a or head["temp_dir"] in a for a in p.info["cmdline"] or ())]
    assert not left, left
