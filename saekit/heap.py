"""Keep glibc's freed blocks for reuse across training steps.

A training step allocates and frees the same tens of megabytes each time (the [N, d] activations, the [n, d]
gradients). glibc's malloc gives freed memory back to the kernel (blocks above its adaptive mmap threshold, and free
space at the heap's top beyond its trim threshold), and the next step faults those pages in again: 3,600–12,700
page faults and 10–28 ms of kernel time a step at d_sae 4608, 4096 tokens. Fixing the threshold at glibc's own
adaptive ceiling (32 MB) and trimming only beyond 64 MB of free space removed them: 151 vs 173 ms a step, medians
of 6 alternating processes each (`benchmarks/heap.py`, AMD Zen 4, 2 threads). A 1 GB or a 64 MB threshold measured
no faster than the default, and a trim threshold alone made steps slower (setting either one stops glibc's
adaptation, which leaves the mmap threshold at 128 kB). The cost: up to 64 MB of freed memory stays with the process.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
"""Blocks below this size come from the heap and are reused: glibc's adaptive ceiling on 64-bit (32 MB)."""


@functools.cache
def keep_freed_blocks() -> bool:
    """Set glibc's mmap and trim thresholds for the process (once); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # musl's mallopt is a stub that returns 0: then nothing changed, and we say so.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))
