"""Experiments as ML teams run them (issue #22): a run's options in a YAML file (--config), MLflow and W&B through
accelerate's trackers (offline: SQLite and WANDB_MODE=offline), the exported model registered in MLflow and
loaded back by the edge tools as models:/NAME/VERSION. Tiny runs (64 px, one epoch per phase); everything is
read back through the trackers' own clients."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import QUICK, ROOT, xray_export, xray_infer
from test_train import data, train  # noqa: F401  (data: the split, a fixture)

from xray.common.artifacts import read_csv

pytestmark = pytest.mark.slow

TINY = ["--epochs-a", 1, "--epochs-b", 1, "--patience", 0]


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """Each test chooses its own store: nothing inherited from the environment or an earlier test."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tracked(data, tmp_path_factory):
    """One tiny run with all three trackers, its options from a config file (and one from the command line)."""
    root = tmp_path_factory.mktemp("tracked")
    config = root / "run.yaml"
    config.write_text(f"data_dir: {data}\nimage_size: 64\nbatch_size: 16\nworkers: 0\nepochs_a: 1\nepochs_b: 1\n"
                      "patience: 0\nreport_to: [tensorboard, mlflow, wandb]\nseed: 7\n")
    env = {"WANDB_CACHE_DIR": str(root / "wandb-cache")}
    proc = train("--config", config, "--output-dir", root / "runs", "--run-name", "tracked", "--lr-a", 2e-3, env=env)
    return root, root / "runs" / "tracked", data, proc


def _client(run_dir):
    from mlflow import MlflowClient

    saved = json.loads((run_dir / "mlflow.json").read_text())
    return MlflowClient(tracking_uri=saved["tracking_uri"], registry_uri=saved["tracking_uri"]), saved


def test_mlflow_has_the_config_and_both_phases_metrics(tracked):
    root, run_dir, _, _ = tracked
    client, saved = _client(run_dir)
    assert saved["tracking_uri"] == f"sqlite:///{(root / 'runs' / 'mlflow.db').resolve()}"
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model"] == "efficientnet_lite0" and run.data.params["image_size"] == "64"
    assert json.loads(run.data.params["phase_a"])["lr"] == pytest.approx(2e-3)  # the command line beat the file
    history = read_csv(run_dir / "history.csv")
    for phase in ("A", "B"):
        logged = client.get_metric_history(saved["run_id"], f"{phase}/val_macro_f1")
        want = [float(r["val_macro_f1"]) for r in history if r["phase"] == phase]
        assert [m.value for m in logged] == pytest.approx(want, abs=1e-6), phase
    assert (run_dir / "tensorboard").is_dir()  # TensorBoard where it always was


def test_wandb_offline_run_holds_the_summary(tracked):
    _, run_dir, _, _ = tracked
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    proc = subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", str(runs[0])], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["summary"]
    history = read_csv(run_dir / "history.csv")
    last_b = [r for r in history if r["phase"] == "B"][-1]
    assert summary["B/val_macro_f1"] == pytest.approx(float(last_b["val_macro_f1"]), abs=1e-6)


def test_the_saved_config_reproduces_the_run(tracked):
    root, run_dir, data, _ = tracked
    saved = (run_dir / "config.yaml").read_text()
    assert "run-name" not in saved and "output-dir" not in saved and "resume:" not in saved
    assert "lr-a: 0.002" in saved  # keys as the options are typed
    again = train("--config", run_dir / "config.yaml", "--report-to", "tensorboard", "--output-dir", root / "runs",
                  "--run-name", "again")
    first, second = read_csv(run_dir / "history.csv"), read_csv(root / "runs" / "again" / "history.csv")
    assert float(second[0]["train_loss"]) == pytest.approx(float(first[0]["train_loss"]), rel=1e-5)
    assert json.loads((root / "runs" / "again" / "config.json").read_text()) == json.loads(
        (run_dir / "config.json").read_text())
    assert again.returncode == 0


def test_bad_config_and_unreachable_tracker_stop_before_training(tracked, tmp_path):
    _, _, data, _ = tracked
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\n")
    proc = train("--config", bad, "--data-dir", data, check=False)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and re.fullmatch(
        rf"error: --config {re.escape(str(bad))}: unknown key 'epochs'; did you mean 'epochs[-_][ab]'\?", line), line
    start = time.monotonic()
    proc = train("--data-dir", data, "--output-dir", tmp_path / "runs", "--run-name", "down", *TINY,
                 "--report-to", "mlflow", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, check=False)
    assert proc.returncode == 2 and "--report-to mlflow: cannot use the tracking store http://127.0.0.1:9" in proc.stderr
    assert time.monotonic() - start < 60 and not (tmp_path / "runs" / "down").exists()  # nothing trained
    # W&B asked to go online without a key: one line, before training, and the run name is still free
    proc = train("--data-dir", data, "--output-dir", tmp_path / "runs", "--run-name", "nokey", *TINY,
                 "--report-to", "wandb", env={"WANDB_MODE": "online", "WANDB_API_KEY": "",
                                              "WANDB_BASE_URL": "http://127.0.0.1:9",
                                              "WANDB_CACHE_DIR": str(tmp_path / "wb")}, check=False)
    assert proc.returncode == 2 and "--report-to: a tracker did not start" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "nokey" / "config.json").exists()


def test_export_registers_the_model_and_the_edge_loads_it_by_name(tracked, tmp_path):
    root, run_dir, data, _ = tracked
    client, saved = _client(run_dir)
    proc = xray_export(run_dir, *QUICK, "--eval-split", "val", "--min-agreement", 0.5, "--max-accuracy-drop", 50,
                       "--register", "chest-xray")
    assert "MLflow: chest-xray version 1" in proc.stdout
    (version,) = client.search_model_versions("name='chest-xray'")
    assert version.run_id == saved["run_id"] and str(version.version) == "1"
    folder = client.get_run(saved["run_id"]).data.tags["xray.export_folder"]
    assert folder.startswith("export-") and version.source.endswith("/" + folder)
    files = {f.path for f in client.list_artifacts(saved["run_id"], folder)}
    assert {f"{folder}/model.onnx", f"{folder}/model.int8.onnx", f"{folder}/export_report.json"} <= files
    metrics = client.get_run(saved["run_id"]).data.metrics
    assert "export/onnx_int8_accuracy" in metrics and client.get_run(saved["run_id"]).data.tags["xray.export"] == "accepted"
    assert version.tags["xray.int8"] == "accepted" and "int8 (model.int8.onnx)" in version.description

    env = {"MLFLOW_TRACKING_URI": saved["tracking_uri"], "XRAY_MODEL_CACHE": str(tmp_path / "cache")}
    image = next((data / "test").rglob("*.png"))
    by_name = xray_infer(str(image), "--model", "models:/chest-xray/1", "--format", "json", env=env)
    by_path = xray_infer(str(image), "--model", str(run_dir / "export"), "--format", "json")
    assert json.loads(by_name.stdout)["predictions"] == json.loads(by_path.stdout)["predictions"]
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / ".complete").exists() and cached.name.startswith("chest-xray_1-")

    # exported again (another folder, another date): version 2, and version 1 still holds its own files
    v1 = (cached / "export_report.json").read_bytes()  # its export_date differs from the next export's
    time.sleep(1.1)  # export dates are to the second
    again = xray_export(run_dir, *QUICK, "--eval-split", "val", "--min-agreement", 0.5, "--max-accuracy-drop", 50,
                        "--output-dir", tmp_path / "export2", "--register", "chest-xray")
    assert "MLflow: chest-xray version 2" in again.stdout
    xray_infer(str(image), "--model", "models:/chest-xray/1", env={**env, "XRAY_MODEL_CACHE": str(tmp_path / "c2")})
    (refetched,) = (tmp_path / "c2").iterdir()
    assert (refetched / "export_report.json").read_bytes() == v1

    blocked = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'mlflow':\n"
               "            raise ImportError('no mlflow here', name=name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "from xray.infer.cli import main\nmain(prog_name='xray-infer')\n")
    proc = subprocess.run([sys.executable, "-c", blocked, str(image), "--model", "models:/chest-xray/1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "MLflow is not installed" in proc.stderr


def test_a_rejected_export_is_logged_and_never_registered(tracked, tmp_path):
    root, run_dir, _, _ = tracked
    client, saved = _client(run_dir)
    proc = xray_export(run_dir, *QUICK, "--eval-split", "val", "--output-dir", tmp_path / "strict",
                       "--min-agreement", 1.0, "--max-accuracy-drop", -100, "--register", "strict-model", check=False)
    assert proc.returncode == 1 and "not registered" in proc.stderr
    assert client.search_model_versions("name='strict-model'") == []
    assert any(f.path.startswith("export-rejected") for f in client.list_artifacts(saved["run_id"]))


def test_an_int8_kept_by_allow_drop_is_never_registered(tracked, tmp_path):
    """--allow-drop keeps a failed int8 model in the export folder; the registered version holds model.onnx alone,
    says why (tags, description, the export's line), and the edge tools run it as fp32."""
    _, run_dir, data, _ = tracked
    client, saved = _client(run_dir)
    out = tmp_path / "dropped"
    proc = xray_export(run_dir, *QUICK, "--eval-split", "val", "--output-dir", out, "--min-agreement", 1.0,
                       "--max-accuracy-drop", -100, "--allow-drop", "--emulated-images", 0,
                       "--register", "lenient-model")
    assert (out / "model.int8.onnx").is_file()  # the local folder keeps what --allow-drop asked for
    assert "MLflow: lenient-model version 1, model.onnx only: the int8 model failed its gate" in proc.stdout
    (version,) = client.search_model_versions("name='lenient-model'")
    folder = client.get_run(saved["run_id"]).data.tags["xray.export_folder"]
    assert version.source.endswith("/" + folder)
    files = {f.path for f in client.list_artifacts(saved["run_id"], folder)}
    assert {f"{folder}/model.onnx", f"{folder}/export_report.json"} <= files
    assert not [f for f in files if "int8" in f]
    assert [f.path for f in client.list_artifacts(saved["run_id"], f"{folder}-int8-rejected")] == [
        f"{folder}-int8-rejected/model.int8.rejected.onnx"]
    gate = json.loads((out / "export_report.json").read_text())["gate"]
    assert version.tags["xray.int8"] == "rejected" and version.tags["xray.int8_gate"] == "FAIL, kept by --allow-drop"
    drop = float(version.tags["xray.int8_accuracy_drop_points"])
    assert drop == pytest.approx(gate["accuracy_drop_points"], abs=1e-3)
    assert version.description.startswith("fp32 only (model.onnx): the int8 model was rejected by the export gate")
    tags = client.get_run(saved["run_id"]).data.tags
    assert tags["xray.export"] == "fp32-only" and tags["xray.int8"] == "rejected"

    env = {"MLFLOW_TRACKING_URI": saved["tracking_uri"], "XRAY_MODEL_CACHE": str(tmp_path / "cache")}
    image = next((data / "test").rglob("*.png"))
    by_name = json.loads(xray_infer(str(image), "--model", "models:/lenient-model/1", "--format", "json",
                                    env=env).stdout)
    assert by_name["model"]["precision"] == "fp32" and by_name["model"]["path"].endswith("/model.onnx")
    (cached,) = (tmp_path / "cache").iterdir()
    assert not list(cached.glob("*int8*"))
    by_path = xray_infer(str(image), "--model", out / "model.onnx", "--format", "json")
    assert by_name["predictions"] == json.loads(by_path.stdout)["predictions"]


def test_a_resumed_run_goes_on_in_its_own_mlflow_run_and_store(data, tmp_path):
    """Crashed mid phase B, resumed from another folder without --output-dir: the same MLflow run (in the store
    mlflow.json names, not a new ./runs/mlflow.db) ends FINISHED with every epoch of both phases."""
    out = tmp_path / "elsewhere"
    args = ["--data-dir", data, "--report-to", "mlflow", "--epochs-a", 2, "--epochs-b", 2, "--patience", 0,
            "--checkpoint-every", 2]
    crashed = train(*args, "--output-dir", out, "--run-name", "cut", env={"XRAY_TEST_FAIL_AFTER_STEPS": "13"},
                    check=False)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    run_dir = out / "cut"
    first_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    from conftest import run_command
    from test_train import FAST, MAIN

    run_command([sys.executable, MAIN, *FAST, "--resume", run_dir, "--report-to", "mlflow"], cwd=cwd)
    assert not (cwd / "runs").exists()  # no second store next to where the command ran
    client, saved = _client(run_dir)
    assert saved["run_id"] == first_id
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    history = read_csv(run_dir / "history.csv")
    for phase in ("A", "B"):
        steps = sorted({m.step for m in client.get_metric_history(first_id, f"{phase}/val_macro_f1")})
        assert len(steps) == sum(r["phase"] == phase for r in history) == 2, (phase, steps)
