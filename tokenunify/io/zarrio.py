"""Writing zarr v3 volumes with their spatial attributes, safely.

- :func:`create_volume` makes an array with ``voxel_size``/``offset`` (nm, z y x),
  ``axis_names``, ``units`` and a provenance record.
- Every array the pipeline writes stores every chunk, all-fill ones included
  (:data:`WRITE_CONFIG`, through :func:`create_array` and :func:`writable`), so a missing chunk
  file always means damage; :func:`require_complete` finds one before a stage computes (zarr
  would read it as the fill value, 0, without a word).
- Stages never write zarr through ``dask.array.to_zarr``, which silently loses data when two
  tasks write one chunk (measured with dask's threaded scheduler: 15-30 % of voxels lost when
  dask chunks are smaller than the zarr chunk or shard): every task writes whole chunks of its
  own (tokenize: one chunk per crop; infer: one chunk per block).
- :class:`StagedOutput` builds an output directory under ``<name>.partial`` and renames it into
  place only when complete, so a crash never leaves a half-written output that looks finished,
  and an earlier complete output is replaced only by a complete new one.
- Locks on outputs live in :mod:`tokenunify.io.locks`, content identities in
  :mod:`tokenunify.io.identity`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

import tokenunify
from tokenunify.io.identity import Lineage

log = logging.getLogger(__name__)

AXES = ["z", "y", "x"]


def provenance(stage: str, lineage: Lineage, inputs: list[str] | dict) -> dict:
    """The lineage record stored as ``attrs['provenance']`` on every output: the content
    identity, the digest of the settings, the input paths, the package version and the time."""
    return {"stage": stage, "identity": lineage.identity, "config_digest": lineage.settings,
            "inputs": inputs, "tokenunify_version": tokenunify.__version__,
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
            return writable(arr)
        del group[name]
    arr = create_array(group, name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                       compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3),
                       dimension_names=dims)
    arr.attrs.update(meta)
    return arr


#: Runtime config of every array the pipeline writes: all-fill chunks are stored too, so the
#: chunk grid on disk is complete by construction. zarr keeps this config on the Array object
#: only (not in zarr.json): an array reopened to be written must go through :func:`writable`.
WRITE_CONFIG = {"write_empty_chunks": True}


def create_array(group: zarr.Group, name: str, **kwargs) -> zarr.Array:
    """``group.create_array(name, **kwargs)`` with :data:`WRITE_CONFIG` (every chunk stored)."""
    return group.create_array(name, config=WRITE_CONFIG, **kwargs)


def writable(array: zarr.Array) -> zarr.Array:
    """``array`` (e.g. reopened by a worker task) set to store every chunk it is given."""
    return array.with_config(WRITE_CONFIG)


class IncompleteArrayError(ValueError):
    """A pipeline-written zarr array lacks chunk files: not completely written, or damaged."""

    def __init__(self, message: str, path: str, missing: list[tuple[int, ...]], total: int):
        super().__init__(message)
        self.path, self.missing, self.total = path, missing, total


def array_path(array: zarr.Array) -> str:
    """Where ``array`` is stored: a folder for a local store, else the store's URL."""
    from zarr.storage import LocalStore

    store, path = array.store_path.store, array.store_path.path
    if isinstance(store, LocalStore):
        return os.path.join(str(store.root), path) if path else str(store.root)
    return str(array.store_path)


def stored_keys(array: zarr.Array) -> set[str]:
    """The keys (relative to the array, e.g. ``c/0/1/2``) of every object stored under it."""
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    store, path = array.store_path.store, array.store_path.path
    if isinstance(store, LocalStore):  # a scandir walk: no stat per file, unlike list_prefix
        keys, todo = set(), [("", array_path(array))]
        while todo:
            rel, folder = todo.pop()
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if e.is_dir():
                            todo.append((rel + e.name + "/", e.path))
                        else:
                            keys.add(rel + e.name)
            except FileNotFoundError:
                pass
        return keys
    prefix = path + "/" if path else ""

    async def listing() -> set[str]:
        return {k[len(prefix):] async for k in store.list_prefix(prefix)}

    return sync(listing())


def require_complete(array: zarr.Array, where: str) -> None:
    """Raise :class:`IncompleteArrayError` if a chunk of ``array`` is not stored.

    zarr reads a missing chunk as the fill value (0), so a deleted chunk file or an unfinished
    write would silently change a stage's result. Pipeline arrays store every chunk
    (:data:`WRITE_CONFIG`), so every key of the chunk grid (the shard grid when sharded: a
    shard is the stored object) must exist. ``where`` (the stage) starts the message, which
    names the array's path, the number of missing chunks and the first few chunk indices.
    Cost: one listing of the array's folder (benchmarks/bench_chunk_check.py).
    """
    grid = [-(-n // c) for n, c in zip(array.shape, array.shards or array.chunks, strict=True)]
    stored = stored_keys(array)
    encode = array.metadata.encode_chunk_key
    missing = [idx for idx in np.ndindex(*grid) if encode(idx) not in stored]
    if not missing:
        return
    path, total = array_path(array), int(np.prod(grid, dtype=np.int64))
    first = ", ".join(f"{list(i)} (key {encode(i)})" for i in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise IncompleteArrayError(
        f"{where}: zarr array {path} is incomplete: {len(missing)} of {total} chunks are not "
        f"stored: chunk index {first}{more}. A missing chunk would read as zeros; the array "
        f"was not completely written or a chunk file was deleted: rerun the stage that writes "
        f"it", path, missing, total)


def staging_path(final: str | Path) -> Path:
    """The staging folder of output ``final``: ``final.partial`` beside it."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def marker_path(staging: str | Path, kind: str, index) -> Path:
    """The done marker of block (or node) ``index`` (a tuple) of ``kind`` in ``staging``."""
    return Path(staging) / ".done" / kind / "_".join(str(int(i)) for i in index)


def mark_done(staging: str | Path, kind: str, index) -> None:
    """Leave the done marker of ``index``; call it only after the block's output is written
    (workers call it with the staging folder's path; :meth:`StagedOutput.mark_done` too)."""
    m = marker_path(staging, kind, index)
    m.parent.mkdir(parents=True, exist_ok=True)
    m.touch()


class StagedOutput:
    """Build ``final`` under ``final.partial``; :meth:`commit` renames it into place.

    The staging folder survives a crash (Snakemake does not know it, so it does not delete it),
    which is what lets a rerun resume from per-block done markers and the last checkpoint. It
    is resumed only when it was made from the same settings and the same inputs (the
    :class:`~tokenunify.io.identity.Lineage` recorded in it equals ``lineage``); otherwise it is
    discarded, with a log line that says what changed. :meth:`commit` writes the lineage into
    the finished output, where the next stage reads it as its input's identity.
    """

    def __init__(self, final: str | Path, lineage: Lineage):
        self.final = Path(final)
        self.path = staging_path(self.final)
        self.lineage = lineage
        if self.path.exists():
            old = Lineage.read(self.path)
            if old != lineage:
                why = ", ".join(lineage.differences(old)) if old else "no identity record"
                log.info("discarding stale staging folder %s (%s)", self.path, why)
                shutil.rmtree(self.path)
            else:
                log.info("resuming from %s (same settings and inputs)", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        lineage.write(self.path)

    @property
    def identity(self) -> str:
        """The content identity of the output being built."""
        return self.lineage.identity

    def marker(self, kind: str, index) -> Path:
        """Path of the done marker of block ``index`` (a tuple) of ``kind``."""
        return marker_path(self.path, kind, index)

    def is_done(self, kind: str, index) -> bool:
        return self.marker(kind, index).exists()

    def mark_done(self, kind: str, index) -> None:
        mark_done(self.path, kind, index)

    def commit(self) -> Path:
        """Drop markers, then atomically replace ``final`` with the staged folder (which
        carries the lineage record)."""
        shutil.rmtree(self.path / ".done", ignore_errors=True)
        self.lineage.write(self.path)
        old = None
        if self.final.exists():
            old = self.final.with_name(self.final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


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
