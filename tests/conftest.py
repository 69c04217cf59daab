"""Shared test helpers: run the real scripts in subprocesses, import their functions in-process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts are plain files, not a package


def run_command(cmd, *, check=True, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a CLI; check=True asserts exit code 0 and shows the output's tail if not. `env` adds to os.environ."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    if check:
        errors = "\n".join(line for line in proc.stderr.splitlines() if "error:" in line)  # e.g. a rank's own line
        assert proc.returncode == 0, (f"{cmd[:3]} exited {proc.returncode}\n{errors}\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
    return proc


def run_script(name: str, *args, check=True) -> subprocess.CompletedProcess:
    """python scripts/<name>.py ARGS."""
    return run_command([sys.executable, SCRIPTS / f"{name}.py", *args], check=check)


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A small generated data/raw (3 classes x 30 images, ~96 px), shared read-only by tests."""
    out = tmp_path_factory.mktemp("synthetic") / "raw"
    run_script("make_synthetic", "--out", out, "--per-class", 30, "--size", 96, "--seed", 1)
    return out


EXPORT = [sys.executable, "-c", "from xray.export.cli import main; main()"]
INFER = [sys.executable, "-c", "from xray.infer.cli import main; main(prog_name='xray-infer')"]
QUICK = ["--threads", "2", "--latency-runs", "3", "--bias-correction-images", "16", "--gptq-images", "16"]  # xray-export, fast


def xray_export(*args, check=True):
    return run_command(EXPORT + list(args), check=check)


def xray_infer(*args, check=True, env=None, stdin=None):
    """xray-infer in a subprocess (check=True asserts exit 0)."""
    if stdin is None:
        return run_command(INFER + list(args), check=check, env=env)
    proc = subprocess.run([str(c) for c in INFER + list(args)], capture_output=True, text=True, input=stdin,
                          env={**os.environ, **env} if env else None, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def run(tmp_path_factory, synthetic_raw):
    """A tiny trained run (Lite0 at 64 px, phase A only) with its split, shared by export and infer tests."""
    base = tmp_path_factory.mktemp("export")
    run_script("split_dataset", "--raw", synthetic_raw, "--out", base / "data")
    args = ["--data-dir", base / "data", "--output-dir", base, "--run-name", "lite", "--image-size", 64,
            "--batch-size", 16, "--workers", 0, "--phases", "A", "--epochs-a", 3, "--lr-a", 3e-3, "--report-to", "none"]
    run_command([sys.executable, ROOT / "train" / "main.py", *args])
    return base / "lite"


@pytest.fixture(scope="session")
def exported(run):
    """xray-export of `run` with a lenient gate (a 3-epoch model is not what the gate is about)."""
    proc = xray_export(run, *QUICK, "--eval-split", "val", "--min-agreement", 0.5, "--max-accuracy-drop", 50)
    return run / "export", proc


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """(fp32 ONNX path, its PyTorch model, classes): ImageNet Lite0 at 64 px with a sharpened random head,
    exported through xray.export with our metadata, so probabilities vary between images."""
    import torch

    from xray.common.model_meta import ModelInfo
    from xray.export.onnx_export import export_onnx, set_metadata
    from xray.train.models import REGISTRY, build_model

    torch.manual_seed(0)
    classes = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    model = build_model("efficientnet_lite0", len(classes), pretrained=True).eval()
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if name.endswith("weight"):
                p.mul_(10)
    spec = REGISTRY["efficientnet_lite0"].spec.with_size(64)
    path = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    export_onnx(model, spec, path)
    set_metadata(path, ModelInfo(classes, spec, "efficientnet_lite0", precision="fp32").to_metadata())
    return path, model, spec, classes


@pytest.fixture(scope="session")
def cam_onnx(tiny_onnx, tmp_path_factory):
    """tiny_onnx's model with the class activation map output (xray-export's EdgeGraph) and no OOD guard: a model
    the node draws heatmaps with, in seconds instead of the trained run's minutes."""
    import torch

    from xray.common.model_meta import ModelInfo
    from xray.export.edge_graph import OUTPUT_NAMES, EdgeGraph
    from xray.export.onnx_export import export_onnx, set_metadata

    _, model, spec, classes = tiny_onnx

    class NoGuard(torch.nn.Module):  # an ood_score output, but no threshold in the metadata: no guard
        def forward(self, pooled, raw):
            return raw.new_zeros(raw.shape[0])

    path = tmp_path_factory.mktemp("cam_onnx") / "model.onnx"
    export_onnx(EdgeGraph(model, NoGuard()), spec, path, output_names=OUTPUT_NAMES)
    set_metadata(path, ModelInfo(classes, spec, "efficientnet_lite0", precision="fp32").to_metadata())
    return path


def backbone_block_of(model) -> dict:
    """state-dict key -> backbone block index."""
    out = {}
    for name, module in model.backbone.named_modules():
        for i, block in enumerate(model.blocks):
            if any(module is m for m in block):
                for tname in module.state_dict():
                    out[f"backbone.{name}.{tname}"] = i
    return out


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(items):
    """Every test that needs the shared trained run goes to one xdist worker (`--dist loadgroup`), so the
    run, its export and xray-eval's evaluation of it are built once, not once per worker."""
    for item in items:
        if "run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("trained_run"))
