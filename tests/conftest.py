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
        assert proc.returncode == 0, f"{cmd[:3]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
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
