"""Peak resident set size of a process, for the benchmarks that report memory.

``VmHWM`` from ``/proc/PID/status``: the high-water mark of the process image, which starts at
``exec``. Not ``ru_maxrss``: Linux keeps the pre-``exec`` high-water mark in it, so a fresh child
reports at least the RSS its parent had when it forked, and a benchmark that spawns its runs
from a process holding torch would partly measure itself. Writing ``5`` to
``/proc/PID/clear_refs`` resets the mark to the current RSS, so that a step's own peak can be
read (Linux only, like ``VmHWM``).
"""

from __future__ import annotations


def peak_rss_gb(pid: int | str = "self", reset: bool = False) -> float:
    """Peak RSS (GiB) of process ``pid`` since it started or since its last reset; with
    ``reset``, read it and start a new peak. 0.0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
        if reset:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        return kib / 2**20
    except (FileNotFoundError, ProcessLookupError, PermissionError, StopIteration):
        return 0.0
