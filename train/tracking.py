"""Experiment tracking through accelerate's trackers: TensorBoard, MLflow, Weights & Biases (--report-to, repeatable).

Offline by default: MLflow writes to sqlite:///<output-dir>/mlflow.db (artifacts beside it in mlartifacts/) unless
MLFLOW_TRACKING_URI says otherwise; W&B runs with WANDB_MODE=offline unless WANDB_MODE is set. A tracker that
cannot start stops the run before training, in one line (accelerate drops a tracker whose package is missing
without a word, and MLflow's client retries an unreachable server for minutes): `preflight()` runs first, with
the client's retries and timeout capped. Only the main process tracks (accelerate's init_trackers and log)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from xray.common.errors import XrayError

TRACKERS = ("tensorboard", "mlflow", "wandb")
PROJECT = "xray-edge"  # the MLflow experiment and the W&B project
MLFLOW_RUN_FILE = "mlflow.json"  # in the run folder: the run id and the absolute tracking URI, for xray-export
EXTRA = {"tensorboard": "tensorboard", "mlflow": "xray-edge[mlflow]", "wandb": "xray-edge[wandb]"}


def mlflow_uri(output_dir: str | Path) -> tuple[str, bool]:
    """(tracking URI, whether it is our default SQLite file)."""
    given = os.environ.get("MLFLOW_TRACKING_URI")
    if given:
        return given, False
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}", True


@contextmanager
def capped_retries():
    """MLflow's HTTP client without its retries (default: ~4 minutes) and with a 5 s timeout, for a check."""
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, MLFLOW_HTTP_REQUEST_TIMEOUT=5):
        yield


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def preflight(report_to: tuple[str, ...], output_dir: str | Path):
    """Each tracker can start: its package imports, and MLflow's store answers (retries 0, 5 s timeout)."""
    for name in report_to:
        try:
            __import__({"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[name])
        except ImportError as e:
            raise XrayError(f"--report-to {name}: {e.name or name} is not installed (pip install "
                            f"'{EXTRA[name]}')") from None
    if "mlflow" in report_to:
        from mlflow import MlflowClient

        uri, ours = mlflow_uri(output_dir)
        if ours:  # SQLite creates the file, not its folder
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        with capped_retries():
            try:
                client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
            except Exception as e:
                raise XrayError(f"--report-to mlflow: cannot use the tracking store {uri}: "
                                f"{' '.join(str(e).split())[:200]}") from None


def make_trackers(report_to: tuple[str, ...], run_dir: Path, output_dir: str | Path, mlflow_run_id: str | None):
    """accelerate tracker objects (started by init_trackers on the main process only)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    out = []
    for name in report_to:
        if name == "tensorboard":
            out.append(TensorBoardTracker("tensorboard", str(run_dir)))  # runs/<run>/tensorboard
        elif name == "mlflow":
            import mlflow

            uri, ours = mlflow_uri(output_dir)
            mlflow.set_tracking_uri(uri)
            artifacts = (Path(output_dir).resolve() / "mlartifacts").as_uri() if ours else None
            out.append(MLflowTracker(PROJECT, logging_dir=artifacts, run_name=run_dir.name, run_id=mlflow_run_id))
        elif name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            out.append(WandBTracker(PROJECT, name=run_dir.name, dir=str(run_dir)))
    return out


def save_mlflow_run(acc, run_dir: Path, output_dir: str | Path):
    """runs/<run>/mlflow.json: {run_id, tracking_uri (absolute), experiment}, so xray-export --register finds it."""
    run = acc.get_tracker("mlflow", unwrap=True)
    uri, _ = mlflow_uri(output_dir)
    (run_dir / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri,
                                                       "experiment": PROJECT}, indent=2))


def saved_mlflow_run(run_dir: Path) -> dict | None:
    path = Path(run_dir) / MLFLOW_RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None
