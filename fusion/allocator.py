"""Process-wide C allocator settings for workloads that allocate and free large arrays.

Why: each VGG16 layer output of a 512x512 slice is 64 MB or more; glibc serves such blocks with
``mmap`` and returns them with ``munmap``, so every layer of every batch faults its pages in
again and the kernel zeroes them.  On the CIRS pair that was more system time than user time
(7.4 million minor faults, 34 s sys against 21 s user for four 512x512 slices, measured with
``benchmarks/allocator.py``, docs/speed-vgg.md).  Keeping freed memory in the heap for reuse removes most of it,
at the price of a resident size that stays near the job's peak instead of falling after each
layer.  One arena for all threads, because glibc's per-thread arenas cannot hold blocks this
large without ``mmap``.

This is a property of the process, not of the science: the node's ``serve`` and the ``fuse``
command call :func:`keep_freed_memory` once at start-up; library users may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt(3) parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.mallopt  # noqa: B018 - attribute probe: musl and macOS libc have no mallopt
    except (OSError, AttributeError):
        return None
    return lib


def keep_freed_memory(trim_threshold_bytes: int = 1 << 30, top_pad_bytes: int = 256 << 20) -> bool:
    """Serve large blocks from one heap and keep up to ``trim_threshold_bytes`` free in it.

    Returns whether the settings were applied (False off glibc, where nothing changes).
    Call before the worker threads start, so that they share the one arena.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = True
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, int(trim_threshold_bytes)),
                         (_M_TOP_PAD, int(top_pad_bytes))):
        ok = bool(libc.mallopt(param, value)) and ok
    return ok


__all__ = ["keep_freed_memory"]
