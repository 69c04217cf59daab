"""On which CPU classes an int8 model is right: the `xray.int8_cpu_classes` metadata and what the edge does with it.

"covered": classes where the model is right by construction (its int8 weights fit every kernel onnxruntime
runs there, checked on the weights at export). "verified": classes where the export actually ran it and
compared it with onnxruntime's unfused reference of the same graph (natively, or under qemu).
"""
from __future__ import annotations

from dataclasses import dataclass

from .cpu import CPU_CLASSES, Cpu

# int8 files exported before the metadata existed: their weights may be full 8-bit (picked on a VNNI machine),
# so they are trusted only where no kernel can saturate and int8 was the export's own default choice
LEGACY_COVERED = ("avx512_vnni", "avx_vnni", "amx", "arm64_dotprod")


@dataclass(frozen=True)
class Int8Classes:
    covered: tuple[str, ...]
    verified: tuple[str, ...]
    legacy: bool  # no xray.quantization: exported before int8 portability was checked

    @classmethod
    def of(cls, quantization: dict, cpu_classes: dict) -> "Int8Classes":
        if not quantization or not cpu_classes:
            return cls(LEGACY_COVERED, (), True)
        known = [c for c in cpu_classes.get("covered", []) if c in CPU_CLASSES]
        return cls(tuple(known), tuple(cpu_classes.get("verified", [])), False)

    def problem(self, cpu: Cpu) -> str | None:
        """Why this int8 model is not trusted on `cpu` (None: it is covered there)."""
        if cpu.cls in self.covered:
            return None
        if self.legacy:
            return (f"this int8 model was exported before int8 portability was checked and is trusted only on "
                    f"VNNI/AMX/Arm dot-product CPUs, not on this one ({cpu.describe()}); re-export it with xray-export")
        if cpu.cls is None:
            return (f"this CPU ({cpu.describe()}) is in none of the CPU classes int8 models are checked for "
                    "(x86-64 without AVX2, or another architecture)")
        return (f"this int8 model is not covered on this CPU ({cpu.describe()}; covered: {', '.join(self.covered)}): "
                "onnxruntime's int8 kernels here can give other answers than the ones it was verified with")

    def note(self) -> str | None:
        """One line for a legacy int8 model, even where it is trusted."""
        if not self.legacy:
            return None
        return ("this int8 model was exported before int8 portability was checked (no xray.quantization): trusted only "
                "on VNNI/AMX/Arm dot-product CPUs; re-export it with xray-export for one that is right on every CPU")
