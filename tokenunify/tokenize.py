"""Tokenize stage: a downloaded volume -> training crops, token layout and a manifest.

Output::

    results/tokens/{dataset}.zarr/
        crops     uint8   (N, cz, cy, cx)  one chunk per crop: training reads a crop in one read
        mean      float32 (N,)             normalisation of each crop (0..255 scale)
        std       float32 (N,)
        position  int64   (N, 3)           first voxel of each crop (z, y, x)
    results/tokens/{dataset}.manifest.parquet   every candidate crop: position, statistics,
                                                 kept or dropped and why, index into crops

A crop of ``crop`` voxels holds ``prod(crop / patch)`` tokens of ``prod(patch)`` voxels each,
ordered z, then y, then x (:func:`patchify`). Tokens of crop i are
``patchify((crops[i] - mean[i]) / std[i], patch)``.

Two Dask passes over the zarr volume, each a set of tasks that read one tile of crops with a
single zarr read: (1) per-crop statistics, in exact integer arithmetic, (2) writing the kept
crops, each into its own zarr chunk (so no two tasks ever write one chunk). Every crop's numbers
are computed from that crop's voxels alone, in integers, so the output is bit-identical whatever
the tile size (``chunks``), scheduler or worker count. Crops are dropped when mostly zero
(padding, zero fill), flat (empty), or holding defective (blank or zero-filled) sections.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import zarr

from tokenunify.config import TokenizeConfig
from tokenunify.io.identity import Lineage, result_settings
from tokenunify.io.zarrio import StagedOutput, create_array, provenance, require_complete

log = logging.getLogger(__name__)

STAT_FIELDS = ("sum", "sumsq", "n", "min", "max", "zeros", "defective")


def crop_positions(shape, crop, stride=None, cover_edges=True) -> np.ndarray:
    """Start voxels (N, 3) of crops tiling a (z, y, x) volume, in z, y, x raster order."""
    stride = stride or crop
    axes = []
    for n, c, s in zip(shape, crop, stride, strict=True):
        if n < c:
            return np.zeros((0, 3), np.int64)
        starts = list(range(0, n - c + 1, s))
        if cover_edges and starts[-1] != n - c:
            starts.append(n - c)
        axes.append(starts)
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], 1).astype(np.int64)


def patchify(crop: np.ndarray, patch) -> np.ndarray:
    """(cz, cy, cx) -> (K, pz*py*px) tokens in z, y, x raster order of patches."""
    pz, py, px = patch
    cz, cy, cx = crop.shape
    t = crop.reshape(cz // pz, pz, cy // py, py, cx // px, px)
    return t.transpose(0, 2, 4, 1, 3, 5).reshape(-1, pz * py * px)


def unpatchify(tokens: np.ndarray, crop, patch) -> np.ndarray:
    """Inverse of :func:`patchify`: (K, P) -> (cz, cy, cx)."""
    pz, py, px = patch
    cz, cy, cx = crop
    t = tokens.reshape(cz // pz, cy // py, cx // px, pz, py, px)
    return t.transpose(0, 3, 1, 4, 2, 5).reshape(cz, cy, cx)


def crop_stats(a: np.ndarray, min_section_std: float) -> np.ndarray:
    """Exact integer statistics of one uint8 crop (z, y, x), in STAT_FIELDS order."""
    s = a.sum(axis=(1, 2), dtype=np.int64)
    sq = np.square(a, dtype=np.uint32).sum(axis=(1, 2), dtype=np.int64)
    n_sec = a.shape[1] * a.shape[2]
    mean = s / n_sec
    sec_std = np.sqrt(np.maximum(sq / n_sec - mean * mean, 0.0))
    zeros_sec = n_sec - np.count_nonzero(a.reshape(a.shape[0], -1), axis=1)
    defective = (sec_std < min_section_std) | (zeros_sec > n_sec // 2)
    return np.array([s.sum(), sq.sum(), a.size, a.min(), a.max(), zeros_sec.sum(),
                     defective.sum()], np.int64)


def _tiles(pos: np.ndarray, crop, tile) -> list[np.ndarray]:
    """Group crop indices by the tile (``tile`` voxels) their start falls in."""
    key = pos // np.asarray(tile)
    _, inverse = np.unique(key, axis=0, return_inverse=True)
    return [np.flatnonzero(inverse.ravel() == t) for t in range(inverse.max() + 1)]


def _read_tile(src, pos: np.ndarray, crop):
    """One zarr read covering every crop of a tile: (region array, region start)."""
    lo = pos.min(0)
    hi = pos.max(0) + np.asarray(crop)
    return np.asarray(src[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]), lo


def _tile_stats(src, pos, crop, min_section_std) -> np.ndarray:
    region, lo = _read_tile(src, pos, crop)
    cz, cy, cx = crop
    return np.stack([crop_stats(region[z:z + cz, y:y + cy, x:x + cx], min_section_std)
                     for z, y, x in pos - lo])


def _tile_write(src, dst, pos, out_index, crop) -> int:
    region, lo = _read_tile(src, pos, crop)
    cz, cy, cx = crop
    for (z, y, x), i in zip(pos - lo, out_index, strict=True):
        dst[int(i)] = region[z:z + cz, y:y + cy, x:x + cx]
    return len(pos)


def _mean_std(s: np.ndarray, sq: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = n.astype(np.float64)
    mean = s / n
    var = np.maximum(sq / n - mean * mean, 0.0)
    return mean, np.sqrt(var)


def run(volume: str | Path, out: str | Path, manifest: str | Path,
        cfg: TokenizeConfig = TokenizeConfig(), array: str = "raw") -> pd.DataFrame:
    """Tokenize the ``array`` of a downloaded zarr group; returns the manifest.

    Args:
        volume: ``results/data/{dataset}.zarr``.
        out: ``results/tokens/{dataset}.zarr``.
        manifest: ``results/tokens/{dataset}.manifest.parquet``.
        cfg: crop/patch sizes in voxels (z, y, x), filters, Dask settings. ``cfg.chunks`` is
            the tile of one Dask task (voxels); default one crop deep and 8 x 8 crops wide.
        array: which array of the group to read.
    """
    src = zarr.open_group(str(volume), mode="r")[array]
    require_complete(src, "tokenize")
    shape = src.shape
    pos = crop_positions(shape, cfg.crop, cfg.stride, cfg.cover_edges)
    if len(pos) == 0:
        raise ValueError(f"{volume}: volume shape {list(shape)} is smaller than tokenize.crop "
                         f"{list(cfg.crop)}")
    cz, cy, cx = cfg.crop
    tile = cfg.chunks or (cz, 8 * cy, 8 * cx)
    groups = _tiles(pos, cfg.crop, tile)
    sched = {"scheduler": cfg.scheduler}
    if cfg.scheduler != "synchronous":
        sched["num_workers"] = cfg.workers

    # Pass 1: exact per-crop statistics, one task per tile.
    jobs = [dask.delayed(_tile_stats)(src, pos[g], cfg.crop, cfg.min_section_std)
             for g in groups]
    stats = np.empty((len(pos), len(STAT_FIELDS)), np.int64)
    for g, st in zip(groups, dask.compute(*jobs, **sched), strict=True):
        stats[g] = st
    df = pd.DataFrame(stats, columns=list(STAT_FIELDS))
    df.insert(0, "z", pos[:, 0])
    df.insert(1, "y", pos[:, 1])
    df.insert(2, "x", pos[:, 2])
    mean, std = _mean_std(df["sum"].to_numpy(), df["sumsq"].to_numpy(), df["n"].to_numpy())
    df["crop_mean"], df["crop_std"] = mean, std
    df["zero_fraction"] = df["zeros"] / df["n"]
    reason = np.full(len(df), "", dtype=object)
    reason[df["defective"].to_numpy() > cfg.max_defective_sections] = "defective_section"
    reason[std < cfg.min_std] = "empty"
    reason[df["zero_fraction"].to_numpy() > cfg.max_zero_fraction] = "zero_fill"
    df["reason"] = reason.astype(str)
    df["kept"] = df["reason"] == ""
    kept = np.flatnonzero(df["kept"].to_numpy())
    df["index"] = -1
    df.loc[kept, "index"] = np.arange(len(kept))
    if len(kept) == 0:
        raise ValueError(f"{volume}: all {len(df)} crops were dropped by the filters "
                         f"({df['reason'].value_counts().to_dict()}); check tokenize settings")

    if cfg.normalize == "per_volume":
        k = df.loc[kept]
        vm, vs = _mean_std(np.array([k["sum"].sum()]), np.array([k["sumsq"].sum()]),
                           np.array([k["n"].sum()]))
        norm_mean = np.full(len(kept), vm[0])
        norm_std = np.full(len(kept), vs[0])
    else:
        norm_mean, norm_std = mean[kept], std[kept]
    norm_std = np.maximum(norm_std, 1e-6)

    # Pass 2: write the kept crops, one task per tile.
    settings = result_settings(cfg.__dict__)
    stage = StagedOutput(out, Lineage.of("tokenize", {"cfg": settings, "array": array},
                                         {"volume": volume}))
    root = zarr.open_group(str(stage.path), mode="a", zarr_format=3)
    spatial = dict(src.attrs)
    # One zarr chunk per crop: tasks write disjoint chunks, training reads a crop in one read.
    crops = create_array(root, "crops", shape=(len(kept), cz, cy, cx), chunks=(1, cz, cy, cx),
                         dtype=np.uint8, fill_value=0,
                         compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3),
                         dimension_names=["crop", "z", "y", "x"], overwrite=True)
    out_index = np.full(len(pos), -1)
    out_index[kept] = np.arange(len(kept))
    writes = [dask.delayed(_tile_write)(src, crops, pos[g[out_index[g] >= 0]],
                                        out_index[g[out_index[g] >= 0]], cfg.crop)
              for g in groups if (out_index[g] >= 0).any()]
    dask.compute(*writes, **sched)
    for name, val in (("mean", norm_mean.astype(np.float32)), ("std", norm_std.astype(np.float32)),
                      ("position", pos[kept])):
        create_array(root, name, data=val, chunks=val.shape, overwrite=True)
    root.attrs.update({
        "crop": list(cfg.crop), "patch": list(cfg.patch),
        "tokens_per_crop": int(np.prod(np.array(cfg.crop) // np.array(cfg.patch))),
        "token_order": "zyx raster of patches; voxels inside a patch in z, y, x order",
        "normalize": cfg.normalize, "voxel_size": spatial.get("voxel_size"),
        "offset": spatial.get("offset"), "axis_names": ["crop", "z", "y", "x"],
        "units": ["", "nm", "nm", "nm"], "n_candidates": int(len(df)), "n_kept": int(len(kept)),
        "provenance": provenance("tokenize", stage.lineage, [str(volume)]),
    })
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=manifest.parent, prefix=manifest.name, suffix=".part")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        stage.commit()
        os.replace(tmp, manifest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s: kept %d of %d crops (%s)", volume, len(kept), len(df),
             df.loc[~df["kept"], "reason"].value_counts().to_dict())
    return df


class TokenCrops:
    """Read-only access to a tokens zarr: ``tokens(i)`` -> (K, P) float32, normalised."""

    def __init__(self, path: str | Path):
        self.root = zarr.open_group(str(path), mode="r")
        self.crops = self.root["crops"]
        for name in ("crops", "mean", "std"):
            require_complete(self.root[name], "pretrain")
        self.mean = np.asarray(self.root["mean"])
        self.std = np.asarray(self.root["std"])
        self.patch = tuple(self.root.attrs["patch"])

    def __len__(self) -> int:
        return self.crops.shape[0]

    def crop(self, i: int) -> np.ndarray:
        """Normalised crop i, float32 (cz, cy, cx)."""
        return ((self.crops[i].astype(np.float32) - self.mean[i]) / self.std[i]).astype(np.float32)

    def tokens(self, i: int) -> np.ndarray:
        """Tokens of crop i, (K, P) float32."""
        return patchify(self.crop(i), self.patch)
