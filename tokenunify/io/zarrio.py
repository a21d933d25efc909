"""Writing zarr v3 volumes with their spatial attributes, safely.

- :func:`create_volume` makes an array with ``voxel_size``/``offset`` (nm, z y x),
  ``axis_names``, ``units`` and a provenance record.
- Stages never write zarr through ``dask.array.to_zarr``, which silently loses data when two
  tasks write one chunk (../shared/notes/install.md §1): every task writes whole chunks of its
  own (tokenize: one chunk per crop; infer: one chunk per block).
- :class:`StagedOutput` builds an output directory under ``<name>.partial`` and renames it into
  place only when complete, so a crash never leaves a half-written output that looks finished,
  and an earlier complete output is replaced only by a complete new one.
- :func:`exclusive` serialises the setup of a staging folder when several batch jobs of one
  stage start at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

import tokenunify

log = logging.getLogger(__name__)

AXES = ["z", "y", "x"]


def provenance(stage: str, config_digest: str, inputs: list[str] | dict) -> dict:
    """The lineage record stored as ``attrs['provenance']`` on every output."""
    return {"stage": stage, "config_digest": config_digest, "inputs": inputs,
            "tokenunify_version": tokenunify.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def create_volume(group: zarr.Group, name: str, shape, chunks, dtype, voxel_size, offset,
                  attrs: dict | None = None, channels: int | None = None) -> zarr.Array:
    """Create (or reopen, if identical) a zarr v3 array with spatial attributes.

    Args:
        group: parent group.
        name: array name.
        shape: (z, y, x) voxels.
        chunks: (z, y, x) chunk shape.
        dtype: numpy dtype.
        voxel_size: (z, y, x) nm.
        offset: (z, y, x) nm of the first voxel.
        attrs: extra attributes (source, provenance, ...).
        channels: if given, a leading channel axis of this size (axes c, z, y, x).
    """
    shape, chunks = tuple(int(s) for s in shape), tuple(int(c) for c in chunks)
    dims = AXES
    if channels is not None:
        shape, chunks, dims = (channels,) + shape, (channels,) + chunks, ["c"] + AXES
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))
    meta = {"voxel_size": [float(v) for v in voxel_size], "offset": [float(o) for o in offset],
            "axis_names": dims, "units": ["nm"] * 3, **(attrs or {})}
    if name in group:
        arr = group[name]
        if isinstance(arr, zarr.Array) and arr.shape == shape and arr.dtype == np.dtype(dtype) \
                and arr.chunks == chunks:
            arr.attrs.update(meta)
            return arr
        del group[name]
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                             compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3),
                             dimension_names=dims, config={"write_empty_chunks": True})
    arr.attrs.update(meta)
    return arr


class StagedOutput:
    """Build ``final`` under ``final.partial``; :meth:`commit` renames it into place.

    The staging folder survives a crash (Snakemake does not know it, so it does not delete it),
    which is what lets a rerun resume from per-block done markers. If the staging folder was made
    for a different config (``digest``), it is discarded.
    """

    def __init__(self, final: str | Path, digest: str):
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.digest = digest
        stamp = self.path / ".tokenunify_digest"
        if self.path.exists():
            old = stamp.read_text() if stamp.exists() else ""
            if old != digest:
                log.info("discarding stale staging folder %s (config changed)", self.path)
                shutil.rmtree(self.path)
            else:
                log.info("resuming from %s", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)

    def marker(self, kind: str, index) -> Path:
        """Path of the done marker of block ``index`` (a tuple) of ``kind``."""
        return self.path / ".done" / kind / "_".join(str(int(i)) for i in index)

    def is_done(self, kind: str, index) -> bool:
        return self.marker(kind, index).exists()

    def mark_done(self, kind: str, index) -> None:
        m = self.marker(kind, index)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()

    def commit(self) -> Path:
        """Drop markers, then atomically replace ``final`` with the staged folder."""
        shutil.rmtree(self.path / ".done", ignore_errors=True)
        (self.path / ".tokenunify_digest").unlink(missing_ok=True)
        old = None
        if self.final.exists():
            old = self.final.with_name(self.final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        lock_path(self.final).unlink(missing_ok=True)
        return self.final


def lock_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".lock")


@contextmanager
def exclusive(final: str | Path):
    """Hold an exclusive lock (``flock`` on ``<final>.lock``) for the block: batch jobs of one
    stage set up the shared staging folder one at a time (NFSv4 and Lustre honour flock)."""
    path = lock_path(final)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def blocks(shape, block):
    """Yield (index, box) over a (z, y, x) grid of ``block``-sized boxes (last ones clipped)."""
    grid = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                idx = (z // block[0], y // block[1], x // block[2])
                yield idx, (slice(z, min(z + block[0], shape[0])),
                            slice(y, min(y + block[1], shape[1])),
                            slice(x, min(x + block[2], shape[2])))
