"""heap.block_task: free heap pages go back to the system when a block task ends
(bench_infer.py --parts rss and bench_agglomerate_scale.py measure the effect on whole runs)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

TRIM_CHILD = r"""
import pickle
import numpy as np
from tokenunify import heap
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20
@heap.block_task
def task(n):
    a = np.ones(16 << 20, np.uint8)  # mmapped; freed, it raises glibc's mmap threshold to 16 MiB
    del a
    arrays = []
    for i in range(n):  # 512 KiB arrays (now below the mmap threshold: heap memory) with
        arrays.append(np.ones(512 << 10, np.uint8))  # 4 KiB ones that stay between them
        arrays.append(np.ones(4 << 10, np.uint8))
    kept = arrays[1::2]
    del arrays
    return rss_mib(), kept
assert pickle.loads(pickle.dumps(task)) is task  # Dask ships it by reference
inside, kept = task(400)
print(inside, rss_mib())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_block_task_hands_a_tasks_free_heap_pages_back():
    """200 MiB of heap arrays freed inside a task, with small arrays still alive between them
    (so the heap cannot simply shrink from its top): after the task the process's RSS is back
    down, because block_task trims the arenas."""
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], check=True, capture_output=True,
                         text=True).stdout
    inside, after = map(int, out.split()[-2:])
    assert after < inside - 150, (inside, after)
