"""What this CPU can do for int8 inference, from /proc/cpuinfo (numpy-free, torch-free).

onnxruntime's int8 (u8s8) matrix kernels only beat fp32 with a dot-product instruction for 8-bit
integers: x86 VNNI (AVX-512 VNNI, AVX-VNNI) or AMX, Arm's SDOT/UDOT (asimddp) or I8MM. Measured on
these VMs, int8 EfficientNet-Lite0 runs at 0.89x fp32 on an AVX2-only EPYC and 1.5-1.9x on VNNI/AMX.
"""
from __future__ import annotations

from pathlib import Path

# flag in /proc/cpuinfo -> what it is called in messages
INT8_DOT_FLAGS = {"amx_int8": "AMX", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
                  "i8mm": "Arm I8MM", "asimddp": "Arm dot product"}
X86_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU ('flags' on x86, 'Features' on Arm); empty when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown CPU"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "hardware", "cpu model"):
            return value.strip()
    return "unknown CPU"


def int8_dot_product(flags: set[str] | None = None) -> list[str]:
    """Names of this CPU's int8 dot-product instructions (empty: int8 is no faster than fp32 here)."""
    flags = cpu_flags() if flags is None else flags
    return [name for flag, name in INT8_DOT_FLAGS.items() if flag in flags]


def cpu_has_vnni(flags: set[str] | None = None) -> bool:
    """x86 VNNI/AMX: onnxruntime's u8s8 kernels need no reduced range there."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in X86_VNNI_FLAGS)
