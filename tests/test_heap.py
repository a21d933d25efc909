"""heap.fix_mmap_threshold: with glibc's mmap threshold fixed, freed block-sized arrays go back
to the system; with the dynamic threshold they stay in the heap (bench_infer.py --parts rss
measures the effect on a whole inference run)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = r"""
import sys
import numpy as np
from tokenunify.heap import fix_mmap_threshold
if sys.argv[1] == "1":
    assert fix_mmap_threshold()
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20
a = np.ones(16 << 20, np.uint8)  # mmapped; freed, it raises the dynamic threshold to 16 MiB
del a
arrays = []
for i in range(40):  # 4 MiB arrays (a block task's) with 64 KiB ones that stay between them
    arrays.append(np.ones(4 << 20, np.uint8))
    arrays.append(np.ones(64 << 10, np.uint8))
before = rss_mib()
arrays = arrays[1::2]  # the 4 MiB arrays freed
print(before, rss_mib())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's mmap threshold is glibc's")
def test_fixed_threshold_returns_freed_arrays_to_the_system():
    def run(fixed: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", CHILD, fixed], check=True,
                             capture_output=True, text=True).stdout
        before, after = map(int, out.split()[-2:])
        return before, after

    before, after = run("0")
    assert after > before - 40, "the dynamic threshold keeps the freed 160 MiB in the heap"
    before, after = run("1")
    assert after < before - 120, "with the threshold fixed the 160 MiB go back"


TRIM_CHILD = r"""
import pickle
import numpy as np
from tokenunify import heap
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20
@heap.block_task
def task(n):
    arrays = []
    for i in range(n):  # 512 KiB arrays (below the fixed 1 MiB threshold: heap memory) with
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
