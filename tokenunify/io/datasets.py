"""Declared datasets: the typed source and dataset specs of the config's ``datasets`` section,
and opening a dataset's volumes with every check a schema cannot make (files, keys, shapes,
bounding box, voxel size, roles that need labels).

Dataset and run names follow :data:`NAME_RE`. The sources themselves (:class:`SourceSpec`,
``${VAR}`` expansion) are in :mod:`tokenunify.io.sources`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from tokenunify.errors import ConfigError
from tokenunify.io.sources import Cropped, SourceError, SourceSpec, open_source

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABELLED_ROLES = ("train", "validate", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """A declared dataset. Sizes in voxels (z, y, x), voxel_size and offset in nm (z, y, x)."""

    name: str
    raw: SourceSpec
    labels: SourceSpec | None = None
    voxel_size: tuple[float, float, float] | None = None
    offset: tuple[float, float, float] | None = None
    bbox: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    roles: tuple[str, ...] = ("pretrain",)
    description: str = ""

    @classmethod
    def from_dict(cls, name: str, d: dict) -> DatasetSpec:
        if not NAME_RE.match(name):
            raise ConfigError(f"datasets.{name}: invalid dataset name {name!r}")
        bbox = d.get("bbox")
        return cls(
            name=name,
            raw=SourceSpec.from_dict(d["raw"], f"datasets.{name}.raw.source"),
            labels=(SourceSpec.from_dict(d["labels"], f"datasets.{name}.labels.source")
                    if d.get("labels") else None),
            voxel_size=tuple(d["voxel_size"]) if d.get("voxel_size") else None,
            offset=tuple(d["offset"]) if d.get("offset") is not None else None,
            bbox=(tuple(bbox["start"]), tuple(bbox["stop"])) if bbox else None,
            roles=tuple(d.get("roles", ("pretrain",))),
            description=d.get("description", ""),
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what the schema describes)."""
        d = asdict(self)
        d.pop("name")
        if self.bbox:
            d["bbox"] = {"start": list(self.bbox[0]), "stop": list(self.bbox[1])}
        return json.loads(json.dumps(d))


def open_dataset(spec: DatasetSpec, fetch: bool = True):
    """Open a dataset's raw and label volumes (bbox applied) after checking them.

    Args:
        spec: the dataset.
        fetch: download remote files now; with False an uncached remote file gives (None, None).

    Returns:
        (raw, labels) :class:`~tokenunify.io.sources.Volume` objects; labels may be None.

    Raises:
        ConfigError: a file is missing, a key is wrong, shapes disagree, the bbox does not fit,
            no voxel size is known, or a labelled role has no labels.
    """
    where = f"datasets.{spec.name}"
    for role in spec.roles:
        if role in LABELLED_ROLES and spec.labels is None:
            raise ConfigError(f"{where}.roles: role '{role}' needs labels, but "
                              f"{where}.labels is not set")
    try:
        raw = open_source(spec.raw, where=f"{where}.raw", fetch=fetch)
        labels = (open_source(spec.labels, where=f"{where}.labels", fetch=fetch)
                  if spec.labels else None)
    except SourceError as exc:
        raise ConfigError(str(exc)) from exc
    if raw is None or (spec.labels is not None and labels is None):
        return None, None  # remote file not fetched yet: the download job checks it
    shape = tuple(raw.shape)
    if labels is not None and tuple(labels.shape) != shape:
        raise ConfigError(
            f"{where}: raw shape {list(shape)} (z, y, x) from {spec.raw.source} and labels shape "
            f"{list(labels.shape)} from {spec.labels.source} disagree"
        )
    if spec.bbox is not None:
        start, stop = spec.bbox
        for ax, (a, b, n) in enumerate(zip(start, stop, shape, strict=True)):
            if not 0 <= a < b <= n:
                raise ConfigError(
                    f"{where}.bbox: axis {'zyx'[ax]} range [{a}, {b}) does not fit in the "
                    f"source shape {list(shape)}"
                )
        raw = Cropped(raw, start, stop)
        labels = Cropped(labels, start, stop) if labels is not None else None
    if spec.voxel_size is None and raw.voxel_size is None:
        raise ConfigError(f"{where}.voxel_size: not set, and {spec.raw.source} carries none; "
                          "give it in nm as [z, y, x]")
    return raw, labels


def check_dataset(spec: DatasetSpec) -> None:
    """Deep-check one dataset without downloading remote files (see :func:`open_dataset`)."""
    open_dataset(spec, fetch=False)
