"""Which CPU class this is for int8 inference, from CPUID as onnxruntime sees it (numpy-free of torch).

onnxruntime picks its int8 (u8s8) kernels from CPUID, so that is what decides whether an int8 model is
right here. Without VNNI (AVX2, AVX-512 without VNNI) those kernels add u8 x s8 products pairwise into a
saturating int16 (`vpmaddubsw`): 8-bit weights can overflow there, 7-bit weights cannot. VNNI, AMX and
Arm's kernels accumulate in int32. Speed: int8 EfficientNet-Lite0 ran at 0.89x fp32 on an AVX2-only EPYC
and 1.5-1.9x on VNNI/AMX, so int8 is only preferred where the CPU has an int8 dot-product instruction.

Sources, best first:
1. numpy's CPU feature table (CPUID plus what the OS enables, like onnxruntime's own check). It is private
   (`numpy._core._multiarray_umath.__cpu_features__`), so it is read in one place, here. It works on
   Linux, macOS and Windows, and under `qemu-x86_64 -cpu ...` it sees the emulated CPU.
2. /proc/cpuinfo, for what numpy does not name (AVX-VNNI, AMX; Linux only). Under emulation it shows the
   host's flags, so it is only believed when it agrees with numpy on every flag both can see.
Unknown means "none of the classes": an int8 model is then trusted nowhere but where it was verified.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

CPU_CLASSES = ("avx2", "avx512", "avx512_vnni", "avx_vnni", "amx", "arm64", "arm64_dotprod")
SATURATING_CLASSES = ("avx2", "avx512")  # u8s8 kernels with int16 pair sums: 8-bit weights can overflow
DOT_PRODUCT = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "amx": "AMX",
               "arm64_dotprod": "Arm dot product"}  # classes where int8 beats fp32
# /proc/cpuinfo flag -> numpy's name, for the x86 flags both sources can see (the agreement check)
SHARED_X86_FLAGS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI",
                    "fma": "FMA3", "f16c": "F16C", "bmi2": "BMI2", "movbe": "MOVBE", "gfni": "GFNI",
                    "vaes": "VAES", "vpclmulqdq": "VPCLMULQDQ"}
NUMPY_TABLES = ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath")


@dataclass(frozen=True)
class Cpu:
    cls: str | None  # one of CPU_CLASSES; None: none of them (x86 without AVX2, another architecture, unknown)
    source: str  # where the class came from, for messages

    @property
    def int8_dot_product(self) -> str | None:
        """The name of this CPU's int8 dot-product instruction (None: int8 is no faster than fp32 here)."""
        return DOT_PRODUCT.get(self.cls)

    def describe(self) -> str:
        return f"{self.cls or 'unclassified'} ({self.source})"


def numpy_features() -> dict[str, bool]:
    """numpy's runtime CPU feature table ({} when this numpy has none where we look)."""
    import importlib

    for module in NUMPY_TABLES:
        try:
            table = importlib.import_module(module).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return {str(k): bool(v) for k, v in dict(table).items()}
    return {}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo ('flags' on x86, 'Features' on Arm); empty when unknown."""
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
            return platform.processor() or "unknown CPU"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "hardware", "cpu model"):
            return value.strip()
    return platform.processor() or "unknown CPU"


def classify(features: dict[str, bool], flags: set[str], machine: str) -> Cpu:
    """The CPU class from numpy's features, /proc/cpuinfo flags and platform.machine() (tests pass their own)."""
    machine = machine.lower()
    if machine in ("arm64", "aarch64"):
        if features:
            return Cpu("arm64_dotprod" if features.get("ASIMDDP") else "arm64", "CPUID (numpy)")
        if not flags:
            return Cpu(None, "unknown")
        return Cpu("arm64_dotprod" if "asimddp" in flags else "arm64", "/proc/cpuinfo")
    if machine not in ("x86_64", "amd64"):
        return Cpu(None, f"{machine or 'unknown'} architecture")
    if not features:  # no table in this numpy: /proc/cpuinfo alone (not emulation-proof)
        return (Cpu(x86_class({n for f, n in SHARED_X86_FLAGS.items() if f in flags}, flags), "/proc/cpuinfo")
                if flags else Cpu(None, "unknown"))
    have = {k for k, v in features.items() if v}
    agrees = bool(flags) and all((f in flags) == (n in have) for f, n in SHARED_X86_FLAGS.items())
    cls = x86_class(have, flags if agrees else set())
    return Cpu(cls, "CPUID (numpy)" + (" + /proc/cpuinfo" if agrees and cls in ("avx_vnni", "amx") else ""))


def x86_class(numpy_names: set[str], extra_flags: set[str]) -> str | None:
    """numpy_names: numpy's names of the features present; extra_flags: trusted /proc/cpuinfo flags (AVX-VNNI, AMX)."""
    if "AVX2" not in numpy_names:
        return None
    if "AVX512VNNI" in numpy_names:
        return "amx" if "amx_int8" in extra_flags else "avx512_vnni"
    if "AVX512F" in numpy_names and "AVX512BW" in numpy_names:
        return "avx512"
    return "avx_vnni" if "avx_vnni" in extra_flags else "avx2"


_DETECTED: Cpu | None = None


def detect_cpu() -> Cpu:
    """This CPU's class (read once per process)."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = classify(numpy_features(), cpu_flags(), platform.machine())
    return _DETECTED


def int8_dot_product(cpu: Cpu | None = None) -> list[str]:
    """Names of this CPU's int8 dot-product instructions (empty: int8 is no faster than fp32 here)."""
    name = (cpu or detect_cpu()).int8_dot_product
    return [name] if name else []


def cpu_has_vnni(cpu: Cpu | None = None) -> bool:
    """x86 VNNI/AMX (onnxruntime's u8s8 kernels accumulate in int32 there)."""
    return (cpu or detect_cpu()).cls in ("avx512_vnni", "avx_vnni", "amx")
