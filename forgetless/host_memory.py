"""Keep freed host memory for reuse on CPU runs (glibc malloc settings).

Why: glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmaps and
returns them on free, so every step's large activations (the reference config's logits are
66 MB) page-fault in again, zeroed: about 20 ms per such tensor on this kind of machine, 5% of
a pretraining step. Served from the heap and not trimmed, they are reused instead. Other C
libraries (musl) and other allocators (jemalloc via LD_PRELOAD) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
KEEP = 1 << 30  # free memory glibc may hold before returning it to the system


def keep_freed_memory() -> bool:
    """Whether glibc took the settings (False where there is no glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
