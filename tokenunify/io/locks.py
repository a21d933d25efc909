"""Locks on stage outputs, so that two processes never write one output at once.

- :func:`hold_output`: a stage holds ``.<name>.lock`` (a hidden sibling of its output) for its
  whole run. A full run holds it exclusively; the batch jobs of a blockwise stage (which write
  one shared staging folder by design) hold it shared, plus their own batch's lock
  exclusively. A second process that would collide fails at once with :class:`OutputBusy`,
  naming the output and the holder (pid, host, command).
- :func:`exclusive`: waits for ``.<name>.setup.lock``, so that batch jobs set up their shared
  staging folder one at a time.

``flock`` locks vanish with their process (a killed stage leaves no stale lock); NFSv4 and
Lustre honour them. Lock files are removed by the last holder; a process that opened a lock
file just before it was removed notices (the inode changed) and opens it again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path


class OutputBusy(RuntimeError):
    """Another process holds the output."""


def lock_file(final: str | Path, part: str = "") -> Path:
    """The lock file of ``final`` (``part``: e.g. ``setup`` or ``batch3``)."""
    final = Path(final)
    return final.with_name(f".{final.name}{'.' + part if part else ''}.lock")


def _holder_line() -> str:
    """Who holds the lock: pid, host, start time and the program and its first argument (the
    stage); never the rest of the command line, which may carry settings and URLs."""
    cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]) if sys.argv else "?"
    return (f"pid {os.getpid()} on host {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ({cmd})")


def _holders(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        lines = []
    return "; ".join(lines[-3:]) or "unknown process"


def _open_locked(path: Path, mode: int, blocking: bool) -> int:
    """Open and flock ``path``; retry if it was removed meanwhile. Returns the fd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(str(path)) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was removed by its last holder: lock the new one


def _release(fd: int, path: Path) -> None:
    """Unlock; remove the file when no one else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
    except OSError:
        pass  # others still hold it (shared): leave the file
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def _lock(path: Path, shared: bool, what: str):
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fd = _open_locked(path, mode, blocking=False)
    except BlockingIOError:
        raise OutputBusy(f"{what} is being written by another process: {_holders(path)}. "
                         f"Wait for it to finish (or stop it); a killed process releases the "
                         f"lock by itself ({path})") from None
    try:
        if not shared:
            os.ftruncate(fd, 0)
        os.write(fd, (_holder_line() + "\n").encode())
        yield
    finally:
        _release(fd, path)


@contextmanager
def hold_output(final: str | Path, part: str | None = None):
    """Hold ``final`` for a whole stage run; fail at once if another process holds it.

    Args:
        final: the stage's output path.
        part: None for a whole run (exclusive); a batch name (e.g. ``infer0``,
            ``edges3``) for a batch job: shared on the output, exclusive on the batch.

    Raises:
        OutputBusy: naming the output and the holder.
    """
    final = Path(final)
    with ExitStack() as stack:
        stack.enter_context(_lock(lock_file(final), part is not None, str(final)))
        if part is not None:
            stack.enter_context(_lock(lock_file(final, part), False, f"{final} ({part})"))
        yield


@contextmanager
def exclusive(final: str | Path):
    """Wait for the setup lock of ``final``: batch jobs of one stage set up the shared
    staging folder one at a time."""
    path = lock_file(final, "setup")
    fd = _open_locked(path, fcntl.LOCK_EX, blocking=True)
    try:
        yield
    finally:
        _release(fd, path)
