"""xray-export --register NAME: the export goes to the training run's MLflow run (the files, the report, the
verification figures) and, when it passed its gate, becomes a version of the registered model NAME.

The run is the one runs/<run>/mlflow.json names (written by training with --report-to mlflow), in its tracking
store. Each export is logged in a folder of its own (export-<date>; a rejected one export-rejected-<date>, tag
xray.export=rejected, never registered), so exporting the run again never changes a registered version.
A plain folder is registered (MlflowClient.create_model_version on the run's artifact path): the edge side
downloads it with models:/NAME/VERSION and reads it as any export folder, no MLflow flavour needed."""
from __future__ import annotations

import json
import re
import time
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


def register_export(saved: dict, export_dir: Path, name: str, accepted: bool) -> str | None:
    """Log the export to the run; register it as a version of `name` when accepted. Returns the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, run_id = saved["tracking_uri"], saved["run_id"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    report_path = Path(export_dir) / "export_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    # each export in a folder of its own: a registered version's files never change when the run is exported again
    stamp = re.sub(r"\D", "", str(report.get("export_date", "")))[:14] or time.strftime("%Y%m%d%H%M%S")
    folder = f"export-{stamp}" if accepted else f"export-rejected-{stamp}"
    try:
        client.log_artifacts(run_id, str(export_dir), folder)
        for key, value in verification_figures(report).items():
            client.log_metric(run_id, key, value)
        client.set_tag(run_id, "xray.export", "accepted" if accepted else "rejected")
        client.set_tag(run_id, "xray.export_folder", folder)
        if not accepted:
            return None
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{folder}"
        return str(client.create_model_version(name, source=source, run_id=run_id).version)
    except MlflowException as e:
        raise XrayError(f"--register {name}: {' '.join(str(e).split())[:300]}") from None
