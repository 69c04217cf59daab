"""/openapi.json matches behaviour: schemathesis (`--checks all`, bounded examples, a fixed seed) against a live
xray-serve on loopback, for a model without heatmaps and one with them; 0 failures. schemathesis.toml at the
repository root says the one thing the schema cannot: schema-valid random bytes are not an image (422), nor a
DICOM file for STOW-RS (409). The model with heatmaps also serves STOW-RS (--dicomweb); its multipart/related
body is put on the wire by tests/schemathesis_hooks.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import ROOT
from serving import Server

pytestmark = pytest.mark.slow
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def fuzz(server: Server) -> subprocess.CompletedProcess:
    assert SCHEMATHESIS.exists(), "schemathesis is in the dev extra: make test installs it"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([str(SCHEMATHESIS), "run", server.url + "/openapi.json", "--checks", "all",
                           "--max-examples", "25", "--seed", "7", "--no-color"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.parametrize("kind", ["plain", "heatmaps"])
def test_schemathesis_finds_no_failure(kind, tiny_onnx, cam_onnx, tmp_path):
    args = ("--model", tiny_onnx[0]) if kind == "plain" else ("--model", cam_onnx, "--dicomweb", "--results", tmp_path)
    with Server(*args) as server:
        spec = requests.get(server.url + "/openapi.json", timeout=10).json()
        assert ("/dicomweb/studies" in spec["paths"]) == (kind == "heatmaps")
        post = spec["paths"]["/v1/predict"]["post"]
        multipart = post["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert multipart["required"] == ["file"]  # the server answers 422 without it
        assert multipart["properties"]["file"]["maxItems"] == 16  # --max-files: more get 413
        params = {p["name"]: p for p in post["parameters"]}
        if kind == "plain":  # the server refuses them (400): not offered
            assert "heatmap" not in params and "heatmap_class" not in params
        else:
            assert params["heatmap_class"]["schema"]["anyOf"][0]["enum"] == tiny_onnx[3]
        assert {"400", "408", "413", "422", "503"} <= set(post["responses"])
        bad = requests.post(server.url + "/v1/predict?top_k=0", files={"file": b"x"}, timeout=10)
        assert bad.status_code == 422 and isinstance(bad.json()["detail"], str)  # one line, as every error
        assert "top_k" in bad.json()["detail"]
        proc = fuzz(server)
    summary = proc.stdout[-3000:]
    assert proc.returncode == 0, summary
    assert "passed" in summary and "failure" not in summary.lower().replace("0 failures", ""), summary
