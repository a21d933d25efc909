"""glibc's malloc, held to a fixed mmap threshold in processes that run block tasks.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with its own
``mmap`` and returns it to the system when freed. But each time such a block is freed, glibc
raises the threshold to its size (up to 32 MiB), so the block tasks' arrays of a few MiB soon
come from the heap arenas instead, where freed space is kept and fragments: the process grows
with the number of blocks it has run, not with the blocks it runs at once. Measured with
``benchmarks/bench_infer.py --parts rss`` (2 blocks in flight, 8x the voxels): peak RSS +28 %
with the dynamic threshold, +5 % with a fixed 1 MiB one (the same as starting the process with
``MALLOC_MMAP_THRESHOLD_=1048576``). Setting the threshold turns the dynamic rule off.

Freed space inside the arenas is still kept by the process: after a task of a few hundred MiB
(a hierarchy node near the root, an edges block with its histograms) the next tasks reuse it, but
the process's RSS stays at the high-water mark of everything it has run, so peaks pile up across
phases. :func:`block_task` therefore also hands the free pages back (``malloc_trim(0)``) when a
task ends. Measured with a dev profile of ``benchmarks/bench_agglomerate_scale.py``'s 512^3
octree run (RSS sampled per phase): without it, RSS rose phase after phase to a 1.50 GB peak;
with it, each phase starts back near 0.3-0.7 GB and the peak is the largest phase's own, 1.13 GB.
pyarrow's memory pool (mimalloc), which parquet tables are read through, keeps freed pages as
well: about 50 MB in a process that had run the level-2 nodes of that volume (dev measurement),
handed back by ``release_unused()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20  # bytes: allocations from 1 MiB up are mmapped and returned when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_DONE = False
_LIBC = None


def _glibc():
    """glibc's handle, or None (macOS, musl)."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
        except (OSError, AttributeError):
            libc = False
        _LIBC = libc
    return _LIBC or None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold in this process (once; later calls do nothing). Returns
    whether it is fixed: False without glibc (macOS, musl), where nothing changes."""
    global _DONE
    if _DONE:
        return True
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _DONE = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    if not _DONE:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
    return _DONE


def release_free_memory() -> bool:
    """Hand the free pages back to the system: pyarrow's memory pool's (when pyarrow is loaded:
    parquet tables are read through it) and glibc's arenas (``malloc_trim(0)``). Returns False
    without glibc."""
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim(0)
    return True


def block_task(fn):
    """Decorator for a blockwise task (run by Dask, in a worker process or a thread of the
    client): the mmap threshold is fixed before it runs and free memory handed back after, so
    that a process's RSS follows the tasks it runs at once, not all the tasks it has run."""

    @functools.wraps(fn)
    def task(*args, **kwargs):
        fix_mmap_threshold()
        try:
            return fn(*args, **kwargs)
        finally:
            release_free_memory()

    return task
