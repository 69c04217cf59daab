"""--model models:/NAME/VERSION: an export folder registered in MLflow (xray-export --register NAME), fetched into
a local folder that then goes through the same model choice and CPU checks as any export folder.

MLflow is an optional import here (the edge install has none): without it, one line says what to install. The
store is the one MLFLOW_TRACKING_URI names. A numbered version never changes, so it is kept in the cache
($XRAY_MODEL_CACHE, default ~/.cache/xray-edge/models; the folder name carries a hash of the registry URI) and
fetched once; an alias or "latest" is fetched every
time. A download goes to a temporary folder renamed when complete: never half a model."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from xray.common.errors import XrayError

PREFIX = "models:/"


def is_registry_uri(value: str | None) -> bool:
    return bool(value) and value.startswith(PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("XRAY_MODEL_CACHE") or Path.home() / ".cache" / "xray-edge" / "models")


def fetch_registered(uri: str) -> Path:
    """models:/NAME/VERSION (or models:/NAME@alias, models:/NAME/latest) -> a local export folder."""
    spec = uri[len(PREFIX):]
    if not spec or spec.startswith("/"):
        raise XrayError(f"--model {uri}: expected models:/NAME/VERSION")
    try:
        import mlflow.artifacts
    except ImportError:
        raise XrayError(f"--model {uri}: MLflow is not installed; models:/ needs it (pip install "
                        "'xray-edge[mlflow]', or mlflow-skinny with a tracking server)") from None
    fixed = re.fullmatch(r"[^/@]+/\d+", spec) is not None
    registry = mlflow.get_registry_uri()  # the same NAME/VERSION in two registries are two models
    key = hashlib.sha256(f"{registry}\n{spec}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^\w.@-]+", "_", spec.replace("/", "_"))
    target = cache_root() / f"{readable}-{key}"
    if fixed and (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        try:
            mlflow.artifacts.download_artifacts(uri, dst_path=str(partial))
        except Exception as e:
            raise XrayError(f"--model {uri}: {' '.join(str(e).split())[:300]}") from None
        (partial / ".complete").touch()
        if fixed and (target / ".complete").exists():  # another process got there first: its copy is the same
            return target
        if not fixed:  # an alias may have moved: replace the old copy
            shutil.rmtree(target, ignore_errors=True)
        try:
            partial.rename(target)
        except OSError:  # a concurrent fetch renamed its complete copy into place meanwhile
            if not (target / ".complete").exists():
                raise
        return target
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after a rename; removed after a failure or Ctrl-C
