"""Process-level performance settings for CPU training.

glibc's malloc gives freed memory back to the OS eagerly, so every training step page-faults its large
activation buffers in again: measured here (scripts/bench_train.py), about half of each 224 px step
went to page faults. Keeping freed memory in the process (as MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_
would) made steps 1.2-1.5x faster. mallopt applies the same settings at run time.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2


def tune_malloc(trim_threshold: int = 64 << 30, top_pad: int = 1 << 30) -> bool:
    """Keep freed heap memory instead of trimming it; True if glibc accepted the settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    clamp = lambda v: min(v, 2**31 - 1)
    return bool(mallopt(M_TRIM_THRESHOLD, clamp(trim_threshold))) and bool(mallopt(M_TOP_PAD, clamp(top_pad)))
