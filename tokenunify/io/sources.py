"""Readers for every supported volume source, behind one small interface.

Every reader is a :class:`Volume`: ``shape`` (z, y, x) in voxels, ``dtype``, an optional
``voxel_size`` / ``offset`` in nm (z, y, x) taken from the source's metadata, and
``read(box)`` returning the voxels of a box of three slices. Reads are lazy: only the requested
box is read (one slice file, chunk or page at a time), so memory is bounded by the box. The one
exception is a TIFF whose z sections are not one page each: it is read whole.

A missing or unreadable piece (zarr chunk, precomputed chunk, slice file, page) raises
:class:`MissingDataError` naming it, unless the source declares ``allow_missing: true``; then
it reads as zeros, which tokenize later filters out. Nothing is ever silently zero-filled.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from tokenunify.errors import ConfigError
from tokenunify.io import remote

log = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]
H5_SUFFIXES = (".h5", ".hdf", ".hdf5")
TIFF_SUFFIXES = (".tif", ".tiff")
SLICE_SUFFIXES = (".png",) + TIFF_SUFFIXES
FILE_SUFFIXES = H5_SUFFIXES + TIFF_SUFFIXES + tuple(s + ".gz" for s in H5_SUFFIXES)


@dataclass(frozen=True)
class MappingSpec:
    """Supervoxel -> body table: ``key`` in file ``source`` (None = the labels file)."""

    key: str
    source: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One volume source (see the schema for the meaning of each field)."""

    source: str
    key: str | None = None
    mip: int = 0
    allow_missing: bool = False
    intensity_range: tuple[float, float] | None = None
    mapping: MappingSpec | None = None
    sha256: str | None = None  # of a remote file (or slice stack), checked when fetched

    @classmethod
    def from_dict(cls, d: dict, where: str = "source") -> SourceSpec:
        d = dict(d)
        d["source"] = expand_env(str(d["source"]), where)
        if d.get("mapping"):
            d["mapping"] = MappingSpec(**d["mapping"])
        if d.get("intensity_range") is not None:
            d["intensity_range"] = tuple(d["intensity_range"])
        return cls(**d)


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, where: str) -> str:
    """Replace ``${VAR}`` with the environment variable's value (paths of shared data that
    differ between machines); an unset variable is a ConfigError naming it and ``where``."""
    def sub(m):
        if m.group(1) not in os.environ:
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set "
                              f"(used in {value!r})")
        return os.environ[m.group(1)]

    return _ENV_RE.sub(sub, value)


class SourceError(ValueError):
    """A source cannot be opened or read; the message names it."""


class MissingDataError(SourceError):
    """Part of a volume is missing or unreadable and the source does not allow gaps."""


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _box_shape(box: Box) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


class Volume:
    """A lazily read 3D volume (z, y, x)."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float] | None = None
    offset: tuple[float, float, float] | None = None
    url: str = ""

    def read(self, box: Box) -> np.ndarray:
        """Voxels of ``box`` (three slices with explicit start and stop), shape of the box."""
        raise NotImplementedError

    def full_box(self) -> Box:
        return tuple(slice(0, n) for n in self.shape)

    def describe(self) -> dict:
        """Provenance: what was read, in JSON-able form."""
        return {"url": self.url, "reader": type(self).__name__, "shape": list(self.shape),
                "dtype": str(self.dtype)}


class Cropped(Volume):
    """A bounding-box view of another volume; start/stop in voxels (z, y, x)."""

    def __init__(self, base: Volume, start, stop):
        self.base, self.start = base, tuple(start)
        self.shape = tuple(b - a for a, b in zip(start, stop, strict=True))
        self.dtype, self.voxel_size, self.url = base.dtype, base.voxel_size, base.url
        self.offset = None
        if base.offset is not None and base.voxel_size is not None:
            self.offset = tuple(o + a * v for o, a, v in
                                zip(base.offset, start, base.voxel_size, strict=True))

    def read(self, box: Box) -> np.ndarray:
        return self.base.read(tuple(slice(s.start + a, s.stop + a)
                                    for s, a in zip(box, self.start, strict=True)))

    def describe(self) -> dict:
        return {**self.base.describe(), "bbox_start": list(self.start)}


def _spatial_attrs(attrs) -> tuple[tuple | None, tuple | None]:
    """voxel_size/offset (nm, z y x) from funlib-, CREMI- or tokenunify-style attributes."""
    vs = attrs.get("voxel_size", attrs.get("resolution"))
    off = attrs.get("offset")
    vs = tuple(float(v) for v in vs)[-3:] if vs is not None and len(vs) >= 3 else None
    off = tuple(float(v) for v in off)[-3:] if off is not None and len(off) >= 3 else None
    return vs, off


def _squeeze3(shape, where: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise SourceError(f"{where}: expected a 3D (z, y, x) volume, got shape {list(shape)}")
    return shape


class H5Volume(Volume):
    """An HDF5 dataset (``.h5``/``.hdf``/``.hdf5``; ``.gz`` files are unpacked to the cache)."""

    def __init__(self, path: Path, key: str | None, where: str, url: str):
        import h5py

        self.url = url
        if path.name.endswith(".gz"):
            path = remote.gunzip_cached(path)
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise SourceError(f"{where}.source: cannot open {url} as HDF5: {exc}") from exc
        names: list[str] = []
        self.file.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if key is None:
            if len(names) != 1:
                raise SourceError(f"{where}.key: {url} holds datasets {names}; say which one")
            key = names[0]
        if key not in self.file or not isinstance(self.file[key], h5py.Dataset):
            raise SourceError(f"{where}.key: no dataset {key!r} in {url}; it holds {names}")
        self.key, self.ds = key, self.file[key]
        self.shape = _squeeze3(self.ds.shape, f"{where} ({url}:{key})")
        self.dtype = self.ds.dtype
        self.voxel_size, self.offset = _spatial_attrs(self.ds.attrs)

    def read(self, box: Box) -> np.ndarray:
        lead = (0,) * (self.ds.ndim - 3)
        return np.asarray(self.ds[lead + tuple(box)])

    def describe(self) -> dict:
        return {**super().describe(), "key": self.key}


class ZarrVolume(Volume):
    """A zarr v2 or v3 array (or an array inside a group, chosen by ``key``)."""

    def __init__(self, path: str, key: str | None, where: str, allow_missing: bool):
        import zarr

        self.url, self.allow_missing, self.where = path, allow_missing, where
        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:  # zarr raises several types for "not a store"
            raise SourceError(f"{where}.source: cannot open {path} as zarr: {exc}") from exc
        if isinstance(node, zarr.Group):
            arrays = sorted(p for p, _ in node.arrays())
            if key is None:
                raise SourceError(f"{where}.key: {path} is a zarr group holding {arrays}; "
                                  "say which array")
            try:
                node = node[key]
            except KeyError:
                raise SourceError(f"{where}.key: no array {key!r} in {path}; "
                                  f"it holds {arrays}") from None
        self.arr, self.key = node, key
        self.shape = _squeeze3(node.shape, f"{where} ({path})")
        self.dtype = node.dtype
        self.voxel_size, self.offset = _spatial_attrs(dict(node.attrs))

    def _check_chunks(self, box: Box) -> None:
        """Raise if a stored chunk (or shard) under ``box`` is absent from the store."""
        from zarr.core.sync import sync

        meta = self.arr.metadata
        grid = getattr(getattr(meta, "chunk_grid", None), "chunk_shape", None) or meta.chunks
        lead = self.arr.ndim - 3
        store, prefix = self.arr.store_path.store, self.arr.store_path.path
        ranges = [range(s.start // g, (s.stop - 1) // g + 1)
                  for s, g in zip(box, grid[lead:], strict=True)]
        for cz in ranges[0]:
            for cy in ranges[1]:
                for cx in ranges[2]:
                    key = meta.encode_chunk_key((0,) * lead + (cz, cy, cx))
                    full = f"{prefix}/{key}" if prefix else key
                    if not sync(store.exists(full)):
                        raise MissingDataError(
                            f"{self.where}: chunk {key!r} of {self.url} is missing (box "
                            f"{[(s.start, s.stop) for s in box]}); set allow_missing: true "
                            "if gaps are expected or the writer skipped empty chunks")

    def read(self, box: Box) -> np.ndarray:
        if not self.allow_missing:
            self._check_chunks(box)
        lead = (0,) * (self.arr.ndim - 3)
        return np.asarray(self.arr[lead + tuple(box)])


class TiffVolume(Volume):
    """A multi-page TIFF stack: one page per z section."""

    def __init__(self, path: Path, where: str, url: str):
        import tifffile

        self.url, self.path = url, path
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                self.shape = _squeeze3(series.shape, f"{where} ({url})")
                self.dtype = np.dtype(series.dtype)
                self.n_pages = len(tif.pages)
        except (OSError, ValueError, IndexError) as exc:
            raise SourceError(f"{where}.source: cannot read {url} as TIFF: {exc}") from exc

    def read(self, box: Box) -> np.ndarray:
        import tifffile

        zs, ys, xs = box
        if self.n_pages == self.shape[0]:
            data = tifffile.imread(self.path, key=range(zs.start, zs.stop))
            data = data.reshape((zs.stop - zs.start,) + data.shape[-2:])
            return np.ascontiguousarray(data[:, ys, xs])
        return np.asarray(tifffile.imread(self.path)).reshape(self.shape)[zs, ys, xs]


class SliceFolder(Volume):
    """A folder of 2D slice images (PNG or TIFF), in natural sort order (2 before 10).

    Numbered files must be consecutive: a gap in the numbering (a missing section) is an error
    unless ``allow_missing`` is set, and then the missing sections read as zeros.
    """

    def __init__(self, path: Path, where: str, allow_missing: bool):
        import imageio.v3 as iio

        self.url, self.where, self.allow_missing = str(path), where, allow_missing
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in SLICE_SUFFIXES),
                       key=lambda p: _natural_key(p.name))
        if not files:
            raise SourceError(f"{where}.source: no .png/.tif slices in folder {path}")
        nums = [re.findall(r"\d+", p.stem) for p in files]
        self.slots: list[Path | None] = list(files)
        if all(nums):
            idx = [int(n[-1]) for n in nums]
            expected = range(idx[0], idx[0] + len(idx))
            if idx != list(expected):
                missing = sorted(set(range(idx[0], idx[-1] + 1)) - set(idx))
                if not allow_missing:
                    raise MissingDataError(
                        f"{where}: slice numbering in {path} has gaps (missing numbers "
                        f"{missing[:10]}{'...' if len(missing) > 10 else ''}); set "
                        "allow_missing: true if gaps are expected")
                by_num = dict(zip(idx, files, strict=True))
                self.slots = [by_num.get(i) for i in range(idx[0], idx[-1] + 1)]
        first = iio.imread(files[0])
        if first.ndim != 2:
            raise SourceError(f"{where}: slice {files[0]} is not a single-channel image "
                              f"(shape {list(first.shape)})")
        self.shape = (len(self.slots),) + first.shape
        self.dtype = first.dtype

    def read(self, box: Box) -> np.ndarray:
        import imageio.v3 as iio

        zs, ys, xs = box
        out = np.zeros(_box_shape(box), self.dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            f = self.slots[z]
            if f is None:
                continue
            try:
                img = iio.imread(f)
            except Exception as exc:  # imageio raises format-specific errors
                if self.allow_missing:
                    log.warning("%s: unreadable slice %s read as zeros: %s", self.where, f, exc)
                    continue
                raise MissingDataError(f"{self.where}: cannot read slice {f}: {exc}") from exc
            if img.shape != self.shape[1:]:
                raise SourceError(f"{self.where}: slice {f} has shape {list(img.shape)}, "
                                  f"the first slice has {list(self.shape[1:])}")
            out[i] = img[ys, xs]
        return out


class PrecomputedVolume(Volume):
    """A Neuroglancer precomputed layer through cloud-volume, at one mip level."""

    def __init__(self, url: str, mip: int, where: str, allow_missing: bool):
        from cloudvolume import CloudVolume

        self.url, self.where = url, where
        try:
            self.cv = CloudVolume(url, mip=mip, fill_missing=allow_missing, bounded=True,
                                  progress=False, parallel=1, cache=False)
            size, vo = self.cv.volume_size, self.cv.voxel_offset
        except Exception as exc:  # cloud-volume raises many types for unreachable layers
            raise SourceError(f"{where}.source: cannot open precomputed {url} "
                              f"(mip {mip}): {exc}") from exc
        if self.cv.num_channels != 1:
            raise SourceError(f"{where}: {url} has {self.cv.num_channels} channels; need 1")
        self.origin = tuple(int(v) for v in vo)  # x, y, z
        self.shape = (int(size[2]), int(size[1]), int(size[0]))
        self.dtype = np.dtype(self.cv.dtype)
        res = [float(r) for r in self.cv.resolution]
        self.voxel_size = (res[2], res[1], res[0])
        self.offset = tuple(o * r for o, r in zip(self.origin[::-1], self.voxel_size,
                                                  strict=True))
        self.mip = mip

    def read(self, box: Box) -> np.ndarray:
        from cloudvolume.exceptions import EmptyVolumeException

        zs, ys, xs = box
        ox, oy, oz = self.origin
        try:
            cut = self.cv[xs.start + ox:xs.stop + ox, ys.start + oy:ys.stop + oy,
                          zs.start + oz:zs.stop + oz]
        except EmptyVolumeException as exc:
            raise MissingDataError(f"{self.where}: missing chunk {exc} in {self.url} (box z "
                                   f"{zs.start}:{zs.stop}, y {ys.start}:{ys.stop}, x "
                                   f"{xs.start}:{xs.stop}); set allow_missing: true if gaps "
                                   "are expected") from exc
        return np.ascontiguousarray(np.asarray(cut)[..., 0].transpose(2, 1, 0))

    def describe(self) -> dict:
        return {**super().describe(), "mip": self.mip}


class SyntheticVolume(Volume):
    """The embedded EM-like generator: ``synthetic://em?shape=Z,Y,X&seed=N[&...]``."""

    def __init__(self, url: str, key: str | None, where: str):
        from tokenunify.data.synthetic import SyntheticConfig, get_generator

        q = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
        try:
            cfg = SyntheticConfig.from_query(q)
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{where}.source: bad synthetic URL {url!r}: {exc}") from exc
        key = key or "raw"
        if key not in ("raw", "labels", "membrane"):
            raise SourceError(f"{where}.key: synthetic sources have keys 'raw', 'labels' "
                              f"and 'membrane', not {key!r}")
        self.gen, self.key, self.url = get_generator(cfg), key, url
        self.shape = cfg.shape
        self.dtype = np.dtype({"raw": np.uint8, "labels": np.uint64, "membrane": np.uint8}[key])
        self.voxel_size, self.offset = cfg.voxel_size, (0.0, 0.0, 0.0)

    def read(self, box: Box) -> np.ndarray:
        return self.gen.read(self.key, box)

    def describe(self) -> dict:
        return {**super().describe(), "key": self.key}


def _local_path(src: str, where: str) -> Path:
    path = Path(src[len("file://"):] if src.startswith("file://") else src)
    if not path.exists():
        raise SourceError(f"{where}.source: file not found: {path}")
    return path


def open_source(spec: SourceSpec, where: str = "source", fetch: bool = True) -> Volume | None:
    """Open the volume a :class:`SourceSpec` points at.

    Args:
        spec: the source spec from the config.
        where: config path used in error messages (e.g. ``datasets.demo.raw``).
        fetch: download remote files (http(s)://, hf://) if they are not cached yet. With
            False, an uncached remote file returns None (the check is left to the download job).

    Raises:
        SourceError: naming the config key and the file or URL.
    """
    src = spec.source
    low = src.lower().split("?")[0]
    if src.startswith("synthetic://"):
        return SyntheticVolume(src, spec.key, where)
    # a remote file not fetched yet is checked by the download job (a local mirror: now)
    unfetched = (not fetch and remote.cached_path(src) is None and not remote.is_mirrored(src))
    if src.startswith(("http://", "https://", "hf://")) and remote.RANGE_RE.search(src):
        if unfetched:
            return None
        try:
            path = remote.fetch_stack(src, spec.sha256)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{where}.source: cannot fetch {src}: {exc}") from exc
        return SliceFolder(path, where, spec.allow_missing)
    object_file = src.startswith(("gs://", "s3://")) and low.rstrip("/").endswith(
        FILE_SUFFIXES + (".zarr",))
    if src.startswith(("precomputed://", "gs://", "s3://")) and not object_file or (
        src.startswith(("http://", "https://")) and not low.endswith(FILE_SUFFIXES)
    ):
        return PrecomputedVolume(src, spec.mip, where, spec.allow_missing)
    if src.startswith(("http://", "https://", "hf://")) or object_file:
        if unfetched:
            return None
        try:
            path = remote.fetch(src, sha256=spec.sha256)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{where}.source: cannot fetch {src}: {exc}") from exc
        return _open_local(path, spec, where, url=src)
    if "://" in src and not src.startswith("file://"):
        raise SourceError(f"{where}.source: unsupported URL scheme in {src!r}")
    return _open_local(_local_path(src, where), spec, where, url=src)


def _open_local(path: Path, spec: SourceSpec, where: str, url: str) -> Volume:
    name = path.name.lower()
    if path.is_dir():
        if name.endswith(".zarr") or (path / "zarr.json").exists() or (path / ".zarray").exists() \
                or (path / ".zgroup").exists():
            return ZarrVolume(str(path), spec.key, where, spec.allow_missing)
        return SliceFolder(path, where, spec.allow_missing)
    if name.endswith(H5_SUFFIXES) or name.endswith(tuple(s + ".gz" for s in H5_SUFFIXES)):
        return H5Volume(path, spec.key, where, url)
    if name.endswith(TIFF_SUFFIXES):
        return TiffVolume(path, where, url)
    raise SourceError(f"{where}.source: don't know how to read {url!r} (expected .h5/.hdf/"
                      ".hdf5[.gz], .tif/.tiff, a .zarr store or a folder of slices)")


def read_mapping(spec: SourceSpec, where: str) -> np.ndarray:
    """The supervoxel -> body table of a labels source, as an (N, 2) uint64 array."""
    import h5py

    assert spec.mapping is not None
    src = spec.mapping.source or spec.source
    if src.startswith(("http://", "https://", "hf://", "s3://", "gs://")):
        try:
            path = remote.fetch(src)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{where}.mapping: cannot fetch {src}: {exc}") from exc
    else:
        path = _local_path(src, f"{where}.mapping")
    if path.name.endswith(".gz"):
        path = remote.gunzip_cached(path)
    with h5py.File(path, "r") as f:
        if spec.mapping.key not in f:
            raise SourceError(f"{where}.mapping.key: no dataset {spec.mapping.key!r} in {src}")
        table = np.asarray(f[spec.mapping.key])
    if table.ndim != 2 or table.shape[1] != 2:
        raise SourceError(f"{where}.mapping: {src}:{spec.mapping.key} has shape "
                          f"{list(table.shape)}; expected (N, 2)")
    if (table < 0).any():
        raise SourceError(f"{where}.mapping: {src}:{spec.mapping.key} has negative ids")
    return table.astype(np.uint64)
