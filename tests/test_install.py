"""Packaging: one `xray` import package, the edge wheel works in a venv without torch."""
from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

EDGE_WHEELS = Path(sys.prefix) / "edge-wheels"  # filled by `make install` (pip download), keeps this offline


def test_editable_install_maps_folders_under_xray():
    import xray.common
    import xray.export
    import xray.infer
    import xray.serve
    import xray.train

    for mod, folder in ((xray.common, "common"), (xray.train, "train"), (xray.export, "export"), (xray.infer, "infer"),
                        (xray.serve, "serve")):
        assert Path(mod.__file__).resolve().parent == ROOT / folder
    # `python -m pytest` puts the repo root on sys.path, so check from elsewhere that nothing bare is importable
    for bare in ("common", "train", "export", "infer", "serve"):
        proc = subprocess.run([sys.executable, "-c", f"import {bare}"], capture_output=True, cwd="/")
        assert proc.returncode != 0, f"a bare `{bare}` module is importable"


@pytest.mark.slow
def test_edge_wheel_imports_without_torch(tmp_path, tiny_onnx):
    assert EDGE_WHEELS.is_dir(), "run `make install` first: it downloads the edge wheels this test installs offline"
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(ROOT)], check=True)
    wheel = next(dist.glob("xray_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("xray_edge-")}
    assert top == {"xray"}, f"only the xray package may land in site-packages, got {top}"
    assert "xray/common/preprocess.py" in names and "xray/infer/cli.py" in names
    assert "xray/serve/static/index.html" in names and "xray/serve/static/app.js" in names
    assert "xray/serve/dicom/node.py" in names and "xray/serve/dicom/sr.py" in names

    env_dir = tmp_path / "edge-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(EDGE_WHEELS)]
    subprocess.run(pip + ["onnxruntime", "numpy", "pillow", "click"], check=True)
    subprocess.run(pip + ["--no-deps", str(wheel)], check=True)
    probe = ("import sys, importlib.util\n"
             "assert importlib.util.find_spec('torch') is None, 'torch must not be in the edge venv'\n"
             "import xray.common.preprocess, xray.common.imageio, xray.common.metrics, xray.infer, xray.infer.cli\n"
             "import onnxruntime\n"
             "assert 'torch' not in sys.modules\n"
             "print('edge ok')\n")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "edge ok" in out.stdout, out.stderr
    cli = subprocess.run([str(env_dir / "bin" / "xray-infer"), "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "Usage" in cli.stdout
    # a real prediction on the edge install: the model file and an image are all it needs
    image = tmp_path / "cxr.png"
    Image.fromarray((np.indices((300, 260)).sum(axis=0) % 256).astype(np.uint8), "L").save(image)
    cli = subprocess.run([str(env_dir / "bin" / "xray-infer"), "--model", str(tiny_onnx[0]), str(image),
                          "--format", "json"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    pred = json.loads(cli.stdout)["predictions"][0]
    assert pred["prediction"] in tiny_onnx[3] and abs(sum(pred["probabilities"].values()) - 1) < 1e-9

    # the service: `pip install 'xray-edge[serve]'` (the extra's wheels only, offline) serves the same prediction
    subprocess.run(pip + ["--find-links", str(dist), "xray-edge[serve]"], check=True)
    assert subprocess.run([str(py), "-c", "import importlib.util as u; assert u.find_spec('torch') is None"]).returncode == 0
    for tracker in ("mlflow", "wandb"):  # the trackers are extras of the training side only
        assert subprocess.run([str(py), "-c", f"import importlib.util as u; assert u.find_spec('{tracker}') is None"]
                              ).returncode == 0, f"{tracker} came with the edge install"
    cli = subprocess.run([str(env_dir / "bin" / "xray-infer"), "--model", "models:/chest-xray/1", str(image)],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "MLflow is not installed" in cli.stderr
    import requests
    from serving import Server

    with Server("--model", tiny_onnx[0], command=[str(env_dir / "bin" / "xray-serve")]) as server:
        r = requests.post(server.url + "/v1/predict", data=image.read_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        served = r.json()["predictions"][0]
        assert served["prediction"] == pred["prediction"]
        for c, p in pred["probabilities"].items():
            assert abs(served["probabilities"][c] - p) < 1e-6
        page = requests.get(server.url + "/")  # the page and its assets are in the wheel
        assert page.status_code == 200 and "not a medical device" in page.text.lower()
        assert requests.get(server.url + "/static/app.js").status_code == 200
    assert server.proc.returncode == 0, server.output()
