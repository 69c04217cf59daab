"""Shared test helpers: run the real scripts in subprocesses, import their functions in-process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts are plain files, not a package


def run_script(name: str, *args, cwd=None, check=True, env=None) -> subprocess.CompletedProcess:
    """python scripts/<name>.py ARGS; check=True asserts exit code 0 and shows stderr if not."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A small generated data/raw (3 classes x 30 images, ~96 px), shared read-only by tests."""
    out = tmp_path_factory.mktemp("synthetic") / "raw"
    run_script("make_synthetic", "--out", out, "--per-class", 30, "--size", 96, "--seed", 1)
    return out
