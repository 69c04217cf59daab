"""xray-export --register NAME: the export goes to the training run's MLflow run (the files, the report, the
verification figures) and, when it passed its gate, becomes a version of the registered model NAME.

The run is the one runs/<run>/mlflow.json names (written by training with --report-to mlflow), in its tracking
store. Each export is logged in a folder of its own (export-<date>; a rejected one export-rejected-<date>, tag
xray.export=rejected, never registered), so exporting the run again never changes a registered version.
A plain folder is registered (MlflowClient.create_model_version on the run's artifact path): the edge side
downloads it with models:/NAME/VERSION and reads it as any export folder, no MLflow flavour needed.

An int8 model that failed its gate (kept by --allow-drop) is never registered: the version holds model.onnx alone
(the edge tools then run fp32), tagged xray.int8=rejected with the measured figures and said so in its
description; the int8 file is logged to the run beside it, as export-<date>-int8-rejected/model.int8.rejected.onnx,
outside the registered folder. The gate's verdict is read from the export report, and without a report saying
int8 passed, int8 is left out."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from xray.common.errors import XrayError
from xray.train.tracking import saved_mlflow_run


def check_register(run_dir: str | None) -> dict:
    """Before exporting: the run has an MLflow run, MLflow is installed, and its store answers with that run
    (retries off, 5 s timeout), else one line and nothing exported."""
    saved = saved_mlflow_run(Path(run_dir)) if run_dir else None
    if saved is None:
        raise XrayError(f"--register needs a run trained with --report-to mlflow ({run_dir or 'no run folder'} has no "
                        "mlflow.json)")
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise XrayError("--register: MLflow is not installed (pip install 'xray-edge[mlflow]')") from None
    from xray.train.tracking import capped_retries

    with capped_retries():
        try:
            MlflowClient(tracking_uri=saved["tracking_uri"]).get_run(saved["run_id"])
        except Exception as e:
            raise XrayError(f"--register: run {saved['run_id']} is not in {saved['tracking_uri']}: "
                            f"{' '.join(str(e).split())[:200]}") from None
    return saved


def verification_figures(report: dict) -> dict[str, float]:
    """The export report's numbers worth comparing runs by: accuracy / macro F1 per model, the gate's figures."""
    out = {}
    for model, m in report.get("metrics", {}).items():
        for key in ("accuracy", "macro_f1", "agreement"):
            if isinstance(m.get(key), (int, float)):
                out[f"export/{model}_{key}"] = float(m[key])
    for key, value in report.get("gate", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"export/gate_{key}"] = float(value)
    return out


INT8 = "model.int8.onnx"
INT8_REJECTED = "model.int8.rejected.onnx"


@dataclass
class Registered:
    """What register_export did: the version (None: not registered) and the line the export prints."""

    version: str | None
    line: str


def int8_verdict(report: dict) -> tuple[bool, dict[str, str]]:
    """(int8 passed its gate, the version's xray.int8* tags). Only a report saying int8_ok counts as passed."""
    gate = report.get("gate", {})
    ok = gate.get("int8_ok") is True
    tags = {"xray.int8": "accepted" if ok else "rejected"}
    for key in ("accuracy_drop_points", "agreement", "ood_agreement"):  # the measured figures
        if isinstance(gate.get(key), (int, float)) and not isinstance(gate.get(key), bool):
            tags[f"xray.int8_{key}"] = f"{gate[key]:.6g}"
    if not ok and gate.get("int8_status"):
        tags["xray.int8_gate"] = str(gate["int8_status"])
    return ok, tags


def version_description(int8_ok: bool, tags: dict[str, str]) -> str:
    """The registered version's description: which models it holds and, without int8, why."""
    if int8_ok:
        return "fp32 (model.onnx) and int8 (model.int8.onnx), both verified against PyTorch by the export gate."
    figures = []
    if "xray.int8_accuracy_drop_points" in tags:
        figures.append(f"accuracy drop {tags['xray.int8_accuracy_drop_points']} points")
    if "xray.int8_agreement" in tags:
        figures.append(f"agreement with PyTorch {float(tags['xray.int8_agreement']) * 100:.2f}%")
    return ("fp32 only (model.onnx): the int8 model was rejected by the export gate"
            + (f" ({', '.join(figures)})" if figures else "")
            + f" and is not part of this version (it is logged to the run as {INT8_REJECTED}).")


def register_export(saved: dict, export_dir: Path, name: str, accepted: bool) -> Registered:
    """Log the export to the run; register it as a version of `name` when accepted (without its int8 model
    when that failed the gate). Returns the version and the line to print."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, run_id = saved["tracking_uri"], saved["run_id"]
    export_dir = Path(export_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    report_path = export_dir / "export_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    int8_ok, int8_tags = int8_verdict(report)
    fp32_only = accepted and not int8_ok
    # each export in a folder of its own: a registered version's files never change when the run is exported again
    stamp = re.sub(r"\D", "", str(report.get("export_date", "")))[:14] or time.strftime("%Y%m%d%H%M%S")
    folder = f"export-{stamp}" if accepted else f"export-rejected-{stamp}"
    try:
        if fp32_only:  # the registered folder never holds an int8 model an edge tool could pick up
            with tempfile.TemporaryDirectory(prefix="xray-register-") as tmp:
                staged = Path(tmp) / "export"
                shutil.copytree(export_dir, staged, ignore=shutil.ignore_patterns(INT8, INT8_REJECTED))
                client.log_artifacts(run_id, str(staged), folder)
                int8_file = export_dir / INT8
                if int8_file.is_file():
                    kept = Path(tmp) / INT8_REJECTED
                    shutil.copyfile(int8_file, kept)
                    client.log_artifact(run_id, str(kept), f"{folder}-int8-rejected")
        else:
            client.log_artifacts(run_id, str(export_dir), folder)
        for key, value in verification_figures(report).items():
            client.log_metric(run_id, key, value)
        client.set_tag(run_id, "xray.export", "rejected" if not accepted else "fp32-only" if fp32_only else "accepted")
        client.set_tag(run_id, "xray.export_folder", folder)
        client.set_tag(run_id, "xray.int8", int8_tags["xray.int8"] if accepted else "rejected")
        if not accepted:
            return Registered(None, f"MLflow: the rejected export is logged to run {run_id} ({folder}/), "
                                    "not registered")
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{folder}"
        version = str(client.create_model_version(name, source=source, run_id=run_id, tags=int8_tags,
                                                  description=version_description(int8_ok, int8_tags)).version)
    except (MlflowException, OSError) as e:  # OSError: a full disk or no permission while logging
        raise XrayError(f"--register {name}: {' '.join(str(e).split())[:300]}") from None
    what = ("model.onnx only: the int8 model failed its gate and is not registered (logged to the run as "
            f"{folder}-int8-rejected/{INT8_REJECTED})" if fp32_only else "model.onnx and model.int8.onnx")
    return Registered(version, f"MLflow: {name} version {version}, {what} (run {run_id}, {uri})")
