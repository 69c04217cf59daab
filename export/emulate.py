"""Run an ONNX model on saved inputs under `qemu-x86_64 -cpu NAME`: what another CPU's kernels make of it.

onnxruntime picks its int8 kernels from CPUID, and qemu-user answers CPUID as the emulated CPU, so an
AVX2-only PC's kernels (which can saturate where VNNI's cannot) run on a VNNI machine, exactly. The child
imports numpy, onnxruntime and xray.common only (`python -m xray.export.emulate MODEL IN.npy OUT.npz`).
Debian's QEMU 7.2 emulates AVX2 but no AVX-512, VNNI or AMX: only the avx2 class can be run this way.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

QEMU = "qemu-x86_64"
EMULATED = {"avx2": "Haswell"}  # CPU class -> the qemu CPU model that has it


def qemu_path() -> str | None:
    """qemu-x86_64 when it is installed and this is an x86-64 host (it runs x86-64 Python binaries)."""
    return shutil.which(QEMU) if platform.machine().lower() in ("x86_64", "amd64") else None


def run_emulated(model: Path, x: np.ndarray, qemu_cpu: str = "Haswell", threads: int = 2,
                 timeout: float = 900) -> tuple[list[np.ndarray], str | None]:
    """Every output of `model` on x under the emulated CPU, and the CPU class the child saw there."""
    qemu = qemu_path()
    if qemu is None:
        raise RuntimeError(f"{QEMU} is not installed (Debian package qemu-user)")
    with tempfile.TemporaryDirectory(prefix="xray-emulate-") as tmp:
        inputs, outputs = Path(tmp) / "x.npy", Path(tmp) / "out.npz"
        np.save(inputs, x)
        cmd = [qemu, "-cpu", qemu_cpu, sys.executable, "-m", "xray.export.emulate", str(model), str(inputs),
               str(outputs), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line][-3:]
            raise RuntimeError(f"{QEMU} -cpu {qemu_cpu} exited {proc.returncode}: {' / '.join(tail)}")
        with np.load(outputs) as got:
            n = int(got["count"])
            return [got[f"out{i}"] for i in range(n)], (str(got["cpu_class"]) or None)


def main(argv: list[str]) -> None:
    """The child: run the model with onnxruntime's default (fused) kernels and save every output."""
    import onnxruntime as ort

    from xray.common.cpu import detect_cpu

    model, inputs, outputs, threads = argv
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: np.load(inputs)})
    np.savez(outputs, count=len(got), cpu_class=detect_cpu().cls or "", **{f"out{i}": v for i, v in enumerate(got)})


if __name__ == "__main__":
    main(sys.argv[1:])
