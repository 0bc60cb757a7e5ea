"""glibc allocator tuning for processes that move images of many MB per call.

By default glibc serves blocks over 128 KiB-32 MiB with fresh mmap()s and hands freed memory back
to the kernel, so every 12 MB request is copied into pages the kernel must fault in and zero
first: measured here, that page-fault work was most of a raw 16x512² round trip
(docs/PERFORMANCE.md). Keeping freed memory in the heap lets the next request reuse warm pages;
the price is that RSS stays at its high-water mark. With freed memory kept, every per-thread
malloc arena keeps a high-water mark of its own (glibc makes up to 8 per core): capping them at
``arena_max`` cut the tiny preset's peak RSS under the memory benchmark's load from 1035-1551 MiB
(7 runs) to 829-1156 MiB (7 runs) here, at the same throughput (docs/PERFORMANCE.md). No-op where glibc's mallopt
is unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_memory(mmap_threshold: int = 512 << 20, top_pad: int = 64 << 20, arena_max: int = 2) -> bool:
    """Asks glibc to serve large blocks from the heap, to keep freed memory, and to share at most
    ``arena_max`` arenas among threads (arenas made before this call stay); True if applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, top_pad),
            (_M_ARENA_MAX, arena_max),
        )
    )
    log.debug("glibc mallopt (keep freed memory): %s", "applied" if ok else "refused")
    return ok
