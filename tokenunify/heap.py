"""Free memory handed back to the system when a block task ends.

A process that runs block tasks one after another (a Dask worker, or the threads of a local
scheduler) keeps the space its finished tasks freed: glibc keeps it in its heap arenas, where
it fragments, and pyarrow keeps it in its own pool (mimalloc), which parquet tables are read
through. The process's RSS then follows everything it has run, not the tasks it runs at once.
:func:`block_task` hands the free pages back when a task ends (``malloc_trim(0)`` and the pool's
``release_unused()``).

History, with the measurements: glibc raises its mmap threshold to the size of each freed mmapped
block (up to 32 MiB), so block-sized arrays soon come from the arenas. A fixed 1 MiB threshold
(``mallopt``) kept inference's peak RSS at +5 % for 8x the voxels (+28 % with the dynamic one,
``benchmarks/bench_infer.py --parts rss``), but it made every activation tensor of the forward
pass a fresh mmap: inference ran 1.9x its bare forward instead of 1.2x (``--parts
overhead``, commit of this change). It is gone; trimming alone gives +6 % (1014 -> 1071 MB).
In the agglomeration, a dev profile of ``benchmarks/bench_agglomerate_scale.py``'s 512^3 octree
run (threads, RSS sampled per phase) peaked at 1.50 GB without the trim and 1.13 GB with it;
pyarrow's pool held about 50 MB after the level-2 nodes of that volume.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_LIBC = None


def _glibc():
    """glibc's handle, or None (macOS, musl)."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            libc = False
        _LIBC = libc
    return _LIBC or None


def release_free_memory() -> bool:
    """Hand the free pages back to the system: pyarrow's memory pool's (when pyarrow is loaded)
    and glibc's arenas' (``malloc_trim(0)``). Returns False without glibc."""
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def arrow_system_pool() -> None:
    """Let pyarrow allocate from glibc (its system pool) instead of its own mimalloc pool: in a
    task that reads many parquet tables (a hierarchy node), the pool keeps the read buffers it
    freed until the task ends. On the 512^3 benchmark's largest level-2 node (443 351 edges,
    ``levels.node_task`` alone in a fresh process, by hand) the node step's peak RSS above the
    process's base was 248 MB with the pool and 201 MB without. Process-wide; cheap to call
    again."""
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def block_task(fn):
    """Decorator for a blockwise task (run by Dask, in a worker process or a thread of the
    client): free memory is handed back when it ends, so that a process's RSS follows the tasks
    it runs at once, not all the tasks it has run."""

    @functools.wraps(fn)
    def task(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release_free_memory()

    return task
