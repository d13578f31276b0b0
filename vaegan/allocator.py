"""The process's memory allocator, set for a training loop's churn (glibc only; elsewhere nothing changes).

Every train step allocates and frees the same activations, several MB each at the main job's config.
glibc's malloc serves a block above its mmap threshold with a fresh mapping and hands a heap top above its
trim threshold back to the OS; its dynamic threshold only rises to the largest mapped block freed so far, so
the next step faults the same pages in again, unless something earlier in the process happened to free a
large mapped block (starting and stopping a local Ray does). On a 2-core CPU the main job's step ran
~33,000 minor page faults per 64-image step with glibc's defaults and ~80 with the thresholds below, at
0.74x their images/s (``benchmarks/step_options.py``, ``allocator`` block).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt's parameters (malloc.h). The mmap threshold is glibc's own ceiling for its dynamic one (32 MiB on
# 64-bit), the trim threshold twice that, as glibc's dynamic rule sets it: a process keeps at most 64 MiB
# of freed memory at the top of each arena, and blocks above 32 MiB still come from (and go back to) the OS.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES


@functools.cache
def keep_step_memory() -> bool:
    """Set glibc's malloc thresholds once per process so that freed activations stay mapped between steps;
    returns whether they were set (False where the C library is not glibc)."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
