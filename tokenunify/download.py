"""Download stage: any declared source -> ``results/data/{dataset}.zarr``.

Output layout (zarr v3 group)::

    {dataset}.zarr/
        raw      uint8  (z, y, x)   chunks = download.block
        labels   uint64 (z, y, x)   only if the dataset declares labels; 0 = background/ignore

Each array carries ``voxel_size`` and ``offset`` (nm, z y x), ``axis_names``, ``units``,
``source`` (what was read) and ``provenance``. The group carries the dataset spec and roles.

The volume is copied block by block (``download.block`` voxels, one zarr chunk each) by a few
threads, so peak memory is about ``workers x block`` whatever the volume size. Work happens in
``{dataset}.zarr.partial`` with a done marker per block: after an interruption a rerun skips the
blocks already written, and the finished group is renamed into place only when complete.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from tokenunify.config import DownloadConfig
from tokenunify.io.datasets import DatasetSpec, open_dataset
from tokenunify.io.identity import Lineage
from tokenunify.io.sources import SourceError, Volume, read_mapping
from tokenunify.io.zarrio import StagedOutput, blocks, create_volume, provenance

log = logging.getLogger(__name__)


def bounded_map(fn, items, workers: int):
    """Like ``ThreadPoolExecutor.map`` but with at most 2 x workers blocks in flight, so memory
    does not grow with the number of blocks. Results come in order; the first error is raised
    after the blocks in flight finish, and no further block is started."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def intensity_range(vol: Volume, block, workers: int = 1,
                    where: str = "raw") -> tuple[float, float]:
    """Streaming (min, max) of a volume, block by block (bounded memory); NaN or infinite
    voxels stop it (:func:`check_finite`; ``where`` names the dataset in the error)."""
    def one(box):
        a = vol.read(box)
        check_finite(a, f"{where} ({vol.url}), {box_str(box)}")
        return float(a.min()), float(a.max())

    lo, hi = np.inf, -np.inf
    for a, b in bounded_map(one, (box for _, box in blocks(vol.shape, block)), workers):
        lo, hi = min(lo, a), max(hi, b)
    return lo, hi


def box_str(box) -> str:
    """'block z 0:16, y 0:64, x 0:64' for error messages."""
    return "block " + ", ".join(f"{ax} {s.start}:{s.stop}" for ax, s in zip("zyx", box,
                                                                             strict=True))


def check_finite(a: np.ndarray, where: str) -> None:
    """Stop on NaN or infinite float raw: they have no 0..255 value (a cast would turn NaN
    into 0 with only a numpy warning). The error names ``where`` and the count in ``a``."""
    if a.dtype.kind != "f" or np.isfinite(a).all():
        return
    counts = ((int(np.isnan(a).sum()), "NaN"), (int(np.isinf(a).sum()), "infinite"))
    what = " and ".join(f"{n} {kind}" for n, kind in counts if n)
    raise SourceError(f"{where}: {what} voxels in this block (the first one found; later blocks "
                      "are not counted). Raw intensities must be finite: replace them in the "
                      "source (e.g. with the background intensity) or crop them out with bbox")


def to_uint8(a: np.ndarray, lo: float, hi: float, where: str = "raw") -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (clipped, rounded); uint8 input passes through.
    NaN or infinite voxels raise SourceError naming ``where`` (:func:`check_finite`)."""
    if a.dtype == np.uint8 and (lo, hi) == (0, 255):
        return a
    check_finite(a, where)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((a.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)


class LabelConverter:
    """Source labels -> uint64, through the optional supervoxel -> body table."""

    def __init__(self, table: np.ndarray | None, where: str):
        self.where = where
        self.mapping = None
        if table is not None:
            self.mapping = {int(a): int(b) for a, b in table}

    def __call__(self, a: np.ndarray) -> np.ndarray:
        import fastremap

        if a.dtype.kind == "f":
            if not np.array_equal(a, np.rint(a)):
                raise SourceError(f"{self.where}: labels are floating point with fractions")
        if a.dtype.kind in "if" and a.size and a.min() < 0:
            raise SourceError(f"{self.where}: labels contain negative ids ({a.min()})")
        a = a.astype(np.uint64)
        if self.mapping is not None:
            a = fastremap.remap(a, self.mapping, preserve_missing_labels=True)
        return a


def local_inputs(spec: DatasetSpec) -> dict[str, str]:
    """The local files a dataset is read from (URLs and synthetic volumes: none; their
    settings are the spec itself), so that replacing a file invalidates a staged download."""
    found = {}
    for name, src in (("raw", spec.raw), ("labels", spec.labels)):
        for i, path in enumerate((src.source, src.mapping.source if src.mapping else None)
                                 if src else ()):
            if path and ("://" not in path or path.startswith("file://")):
                p = Path(path.removeprefix("file://"))
                if p.exists():
                    found[name if i == 0 else f"{name}.mapping"] = str(p)
    return found


def run(spec: DatasetSpec, out: str | Path, cfg: DownloadConfig = DownloadConfig(),
        progress: bool | None = None) -> Path:
    """Download one dataset to ``out`` (a ``.zarr`` folder); resumable; returns ``out``.

    Args:
        spec: the dataset (validated config).
        out: output folder, e.g. ``results/data/demo.zarr``.
        cfg: block size (z, y, x voxels) and worker threads.
        progress: show a progress bar (None = only on a terminal).
    """
    where = f"datasets.{spec.name}"
    raw, labels = open_dataset(spec, fetch=True)
    voxel_size = tuple(spec.voxel_size or raw.voxel_size)
    base = getattr(raw, "base", raw)  # offsets refer to the source's first voxel, before bbox
    offset = spec.offset if spec.offset is not None else (base.offset or (0.0, 0.0, 0.0))
    start = spec.bbox[0] if spec.bbox else (0, 0, 0)
    offset = tuple(float(o + a * v) for o, a, v in zip(offset, start, voxel_size, strict=True))
    shape = tuple(raw.shape)
    block = tuple(min(b, n) for b, n in zip(cfg.block, shape, strict=True))
    spec_dict = spec.to_dict()
    lineage = Lineage.of("download", {"spec": spec_dict, "block": block}, local_inputs(spec))
    stage = StagedOutput(out, lineage)
    root = zarr.open_group(str(stage.path), mode="a", zarr_format=3)

    if raw.dtype == np.uint8:
        lo, hi = 0.0, 255.0
    elif spec.raw.intensity_range is not None:
        lo, hi = spec.raw.intensity_range
    elif "intensity_range" in root.attrs:
        lo, hi = root.attrs["intensity_range"]
    else:
        log.info("%s: raw is %s; computing its intensity range by a streaming pass",
                 spec.name, raw.dtype)
        lo, hi = intensity_range(raw, block, cfg.workers, where=f"{where}.raw")
    root.attrs["intensity_range"] = [lo, hi]

    prov = provenance("download", lineage, {"raw": spec.raw.source,
                                        "labels": spec.labels.source if spec.labels else None})
    raw_out = create_volume(root, "raw", shape, block, np.uint8, voxel_size, offset,
                            {"source": raw.describe(), "intensity_range": [lo, hi],
                             "provenance": prov})
    lab_out = conv = None
    if labels is not None:
        table = read_mapping(spec.labels, f"{where}.labels") if spec.labels.mapping else None
        conv = LabelConverter(table, f"{where}.labels")
        lab_out = create_volume(root, "labels", shape, block, np.uint64, voxel_size, offset,
                                {"source": labels.describe(), "background": 0,
                                 "mapping": spec.labels.mapping.key if table is not None
                                 else None, "provenance": prov})

    n_total = sum(1 for _ in blocks(shape, block))
    n_done = sum(1 for i, _ in blocks(shape, block) if stage.is_done("block", i))
    if n_done:
        log.info("%s: %d of %d blocks already written, resuming", spec.name, n_done, n_total)
    todo = ((i, box) for i, box in blocks(shape, block) if not stage.is_done("block", i))

    def copy_block(item):
        idx, box = item
        raw_out[box] = to_uint8(raw.read(box), lo, hi,
                                f"{where}.raw ({spec.raw.source}), {box_str(box)}")
        if lab_out is not None:
            lab_out[box] = conv(labels.read(box))
        stage.mark_done("block", idx)

    with tqdm(total=n_total, initial=n_done, desc=f"download {spec.name}",
              unit="block", disable=None if progress is None else not progress) as bar:
        for _ in bounded_map(copy_block, todo, cfg.workers):
            bar.update()

    root.attrs.update({"dataset": spec.name, "roles": list(spec.roles), "spec": spec_dict,
                       "provenance": prov})
    final = stage.commit()
    log.info("%s: wrote %s %s (z, y, x) at %s nm", spec.name, final, list(shape),
             list(voxel_size))
    return final
