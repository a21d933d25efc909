"""glibc's malloc, held to a fixed mmap threshold in processes that run block tasks.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own
``mmap`` and returns it to the system when freed. But each time such a block is freed, glibc
raises the threshold to its size (up to 32 MiB), so the block tasks' arrays of a few MiB soon
come from the heap arenas instead, where freed space is kept and fragments: the process grows
with the number of blocks it has run, not with the blocks it runs at once. Measured with
``benchmarks/bench_infer.py --parts rss`` (2 blocks in flight, 8x the voxels): peak RSS +28 %
with the dynamic threshold, +5 % with a fixed 1 MiB one (the same as starting the process with
``MALLOC_MMAP_THRESHOLD_=1048576``). Setting the threshold turns the dynamic rule off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20  # bytes: allocations from 1 MiB up are mmapped and returned when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_DONE = False


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold in this process (once; later calls do nothing). Returns
    whether it is fixed: False without glibc (macOS, musl), where nothing changes."""
    global _DONE
    if _DONE:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _DONE = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    if not _DONE:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
    return _DONE
