"""Run an ONNX model on saved inputs on an emulated CPU (qemu-user): what another CPU's kernels make of it.

onnxruntime picks its int8 kernels from CPUID / HWCAP, and qemu-user answers those as the emulated CPU, so an
AVX2-only PC's kernels (which can saturate where VNNI's cannot) or an Arm board's run here, exactly. The
child imports numpy, onnxruntime and xray.common only (`python -m xray.export.emulate MODEL IN.npy OUT.npz`).

- x86-64 classes run this venv's own Python under `qemu-x86_64` (on an x86-64 host). Debian's QEMU 7.2
  emulates AVX2 but no AVX-512, VNNI or AMX: only `avx2` can be run.
- Arm classes run under `qemu-aarch64`: on an arm64 host with this venv's Python; on an x86-64 host with the
  Python and aarch64 wheels of an arm64 root (scripts/arm64_root.sh, `--arm64-root`). cortex-a72 has no dot
  product (NEON multiply-add kernels), neoverse-n1 has it (udot kernels).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# CPU class -> (architecture, the qemu CPU model that has it)
EMULATED = {"avx2": ("x86_64", "Haswell"), "arm64": ("aarch64", "cortex-a72"),
            "arm64_dotprod": ("aarch64", "neoverse-n1")}
HOST_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def qemu_for(arch: str) -> str | None:
    return shutil.which(f"qemu-{arch}")


def emulator(cls: str, arm64_root: Path | None = None) -> tuple[list[str], dict] | str:
    """(command prefix that runs Python on the emulated CPU of `cls`, extra environment), or why it cannot run."""
    arch, cpu = EMULATED[cls]
    qemu = qemu_for(arch)
    if qemu is None:
        return f"qemu-{arch} is not installed (Debian package qemu-user)"
    if arch == HOST_ARCH:
        return [qemu, "-cpu", cpu, sys.executable], {}
    if arch == "aarch64" and HOST_ARCH == "x86_64":
        if arm64_root is None:
            return "no arm64 root (--arm64-root; scripts/arm64_root.sh builds one)"
        root = Path(arm64_root).resolve() / "root"
        if not (root / "usr/bin/python3").exists() or not (root / "site-packages/onnxruntime").is_dir():
            return f"{arm64_root}: not an arm64 root from scripts/arm64_root.sh"
        return ([qemu, "-cpu", cpu, "-L", str(root), str(root / "usr/bin/python3")],
                {"PYTHONPATH": str(root / "site-packages")})
    return f"a {HOST_ARCH} host cannot run {arch} Python here"


def run_emulated(model: Path, x: np.ndarray, cls: str = "avx2", threads: int = 2, arm64_root: Path | None = None,
                 timeout: float = 900) -> tuple[list[np.ndarray], str | None]:
    """Every output of `model` on x on the emulated CPU of class `cls`, and the CPU class the child saw there."""
    how = emulator(cls, arm64_root)
    if isinstance(how, str):
        raise RuntimeError(how)
    prefix, env = how
    with tempfile.TemporaryDirectory(prefix="xray-emulate-") as tmp:
        inputs, outputs = Path(tmp) / "x.npy", Path(tmp) / "out.npz"
        np.save(inputs, x)
        if env:  # another architecture's Python: this package's pure-Python sources beside its wheels
            import xray.common
            import xray.export

            (Path(tmp) / "xray").mkdir()
            for name, package in (("common", xray.common), ("export", xray.export)):
                (Path(tmp) / "xray" / name).symlink_to(Path(package.__file__).parent)
            env = {**env, "PYTHONPATH": f"{tmp}{os.pathsep}{env['PYTHONPATH']}"}
        cmd = prefix + ["-m", "xray.export.emulate", str(model), str(inputs), str(outputs), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line][-3:]
            raise RuntimeError(f"{' '.join(prefix[:3])} exited {proc.returncode}: {' / '.join(tail)}")
        with np.load(outputs) as got:
            return [got[f"out{i}"] for i in range(int(got["count"]))], (str(got["cpu_class"]) or None)


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
