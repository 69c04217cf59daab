"""xray-export --register NAME: the export goes to the training run's MLflow run (the files, the report, the
verification figures) and, when it passed its gate, becomes a version of the registered model NAME.

The run is the one runs/<run>/mlflow.json names (written by training with --report-to mlflow), in its tracking
store. A rejected export is logged under export-rejected/ with the tag xray.export=rejected, and never registered.
A plain folder is registered (MlflowClient.create_model_version on the run's artifact path): the edge side
downloads it with models:/NAME/VERSION and reads it as any export folder, no MLflow flavour needed."""
from __future__ import annotations

import json
from pathlib import Path

from xray.common.errors import XrayError
from xray.train.tracking import saved_mlflow_run


def check_register(run_dir: str | None) -> dict:
    """Before exporting: the run has an MLflow run and MLflow is installed (else one line, nothing exported)."""
    saved = saved_mlflow_run(Path(run_dir)) if run_dir else None
    if saved is None:
        raise XrayError(f"--register needs a run trained with --report-to mlflow ({run_dir or 'no run folder'} has no "
                        "mlflow.json)")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise XrayError("--register: MLflow is not installed (pip install 'xray-edge[mlflow]')") from None
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
    folder = "export" if accepted else "export-rejected"
    client.log_artifacts(run_id, str(export_dir), folder)
    report_path = Path(export_dir) / "export_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    for key, value in verification_figures(report).items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "xray.export", "accepted" if accepted else "rejected")
    if not accepted:
        return None
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{folder}"
    return str(client.create_model_version(name, source=source, run_id=run_id).version)
