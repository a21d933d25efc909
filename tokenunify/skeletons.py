"""Ground-truth skeletons: one tree of nodes and edges per labelled body, the substrate of the
expected run length (:mod:`tokenunify.run_length`).

Skeletons are traced with kimimaro's TEASAR (the skeletonizer of the igneous / MICrONS stack)
on the whole label volume, in physical units: ``voxel_size`` is passed as kimimaro's
anisotropy, so its vertices are voxel centres in nm and every edge length is in nm. Each
node is stored at its voxel, ``(z, y, x)`` indices into the label volume, which is where the
segmentations under test are read. Bodies smaller than ``dust_threshold`` voxels get no
skeleton, as in the ERL evaluations of FFN, LSD and NISB (tiny bodies carry no run length).

The set is held as flat arrays (no object per node) and saved as one ``.npz`` (written to a
temporary name and renamed, so a reader never sees half a file)::

    nodes      (N, 3) int64    voxel (z, y, x) of each node
    skeleton   (N,)   uint64   ground-truth body of each node
    edges      (M, 2) int64    node indices; both nodes of an edge are in the same body
    edge_nm    (M,)   float64  edge length (nm)
    voxel_size (3,)   float64  nm, (z, y, x)

Limits: the volume is skeletonized whole, in memory (fine for evaluation crops; a large volume
needs igneous' chunked skeletonization, not built here).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokenunify.settings import defaults

log = logging.getLogger(__name__)

_DEFAULTS = defaults("evaluate", "skeletons")


@dataclass
class SkeletonConfig:
    """TEASAR settings (kimimaro's names): a sphere of radius ``scale * r + const_nm`` (r: the
    distance to the boundary, nm) is invalidated around each path; ``dust_threshold``: bodies
    under this many voxels are not skeletonized."""

    enabled: bool = _DEFAULTS["enabled"]
    scale: float = _DEFAULTS["scale"]
    const_nm: float = _DEFAULTS["const_nm"]
    dust_threshold: int = _DEFAULTS["dust_threshold"]


@dataclass
class Skeletons:
    """Ground-truth skeletons as flat arrays (see the module docstring for the shapes)."""

    nodes: np.ndarray
    skeleton: np.ndarray
    edges: np.ndarray
    edge_nm: np.ndarray
    voxel_size: tuple
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.nodes = np.asarray(self.nodes, np.int64).reshape(-1, 3)
        self.skeleton = np.asarray(self.skeleton, np.uint64).ravel()
        self.edges = np.asarray(self.edges, np.int64).reshape(-1, 2)
        self.edge_nm = np.asarray(self.edge_nm, np.float64).ravel()
        self.voxel_size = tuple(float(v) for v in self.voxel_size)
        if len(self.skeleton) != len(self.nodes) or len(self.edge_nm) != len(self.edges):
            raise ValueError(f"skeletons: {len(self.nodes)} nodes with {len(self.skeleton)} "
                             f"body ids, {len(self.edges)} edges with {len(self.edge_nm)} "
                             f"lengths")
        if len(self.edges) and (self.edges.min() < 0 or self.edges.max() >= len(self.nodes)):
            raise ValueError("skeletons: an edge names a node that does not exist")
        if len(self.edges) and np.any(self.skeleton[self.edges[:, 0]]
                                      != self.skeleton[self.edges[:, 1]]):
            raise ValueError("skeletons: an edge joins nodes of two different bodies")

    @property
    def ids(self) -> np.ndarray:
        """Body ids that have at least one edge, sorted (uint64)."""
        return np.unique(self.skeleton[self.edges[:, 0]])

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, total edge length in nm of each), over bodies with at least one edge."""
        body = self.skeleton[self.edges[:, 0]]
        ids, inv = np.unique(body, return_inverse=True)
        return ids, np.bincount(inv, weights=self.edge_nm, minlength=len(ids))

    def save(self, path: str | Path) -> Path:
        """Write the set to ``path`` (``.npz``) through a temporary file and a rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, nodes=self.nodes, skeleton=self.skeleton, edges=self.edges,
                            edge_nm=self.edge_nm, voxel_size=np.asarray(self.voxel_size),
                            settings=np.asarray(json.dumps(self.settings, sort_keys=True)))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Skeletons:
        """Read a set written by :meth:`save`; a missing or foreign file is an error naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no skeleton file (the skeletonize rule writes "
                                    f"it from the dataset's labels)")
        with np.load(path, allow_pickle=False) as z:
            missing = {"nodes", "skeleton", "edges", "edge_nm", "voxel_size"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a skeleton file (missing {sorted(missing)})")
            settings = json.loads(str(z["settings"])) if "settings" in z.files else {}
            return cls(z["nodes"], z["skeleton"], z["edges"], z["edge_nm"],
                       tuple(z["voxel_size"]), settings)

    def segments_at_nodes(self, segmentation) -> np.ndarray:
        """The segment id under every node (N,) uint64, read at the nodes' voxels only
        (zarr coordinate selection; numpy arrays are indexed directly)."""
        if not len(self.nodes):
            return np.zeros(0, np.uint64)
        coords = tuple(self.nodes.T)
        if hasattr(segmentation, "get_coordinate_selection"):
            return np.asarray(segmentation.get_coordinate_selection(coords)).astype(np.uint64)
        return np.asarray(segmentation)[coords].astype(np.uint64)


def skeletonize(labels: np.ndarray, voxel_size, cfg: SkeletonConfig | None = None) -> Skeletons:
    """Skeletons of every body of ``labels`` ((z, y, x) integer array, 0 = unlabelled) with
    kimimaro; ``voxel_size``: (z, y, x) nm."""
    import kimimaro

    cfg = cfg or SkeletonConfig()
    labels = np.ascontiguousarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"skeletonize: labels must be (z, y, x), got shape {labels.shape}")
    vs = np.asarray(voxel_size, np.float64)
    if vs.shape != (3,) or np.any(vs <= 0):
        raise ValueError(f"skeletonize: voxel_size must be three positive nm values, got "
                         f"{voxel_size!r}")
    found = kimimaro.skeletonize(
        labels, teasar_params={"scale": float(cfg.scale), "const": float(cfg.const_nm)},
        anisotropy=tuple(vs), dust_threshold=int(cfg.dust_threshold), fix_branching=True,
        fix_borders=True, progress=False, parallel=1)
    nodes, body, edges, lengths = [], [], [], []
    offset = 0
    for label in sorted(found):
        sk = found[label]
        if not len(sk.edges):
            continue
        vox = np.rint(np.asarray(sk.vertices, np.float64) / vs).astype(np.int64)
        vox = np.clip(vox, 0, np.asarray(labels.shape) - 1)
        e = np.asarray(sk.edges, np.int64)
        nodes.append(vox)
        body.append(np.full(len(vox), label, np.uint64))
        edges.append(e + offset)
        lengths.append(np.linalg.norm(sk.vertices[e[:, 0]] - sk.vertices[e[:, 1]], axis=1))
        offset += len(vox)
    if not nodes:
        out = Skeletons(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 2)), np.zeros(0), tuple(vs),
                        asdict(cfg))
    else:
        out = Skeletons(np.concatenate(nodes), np.concatenate(body), np.concatenate(edges),
                        np.concatenate(lengths), tuple(vs), asdict(cfg))
    inside = labels[tuple(out.nodes.T)] == out.skeleton
    if not np.all(inside):  # kimimaro puts vertices on voxel centres of their own label
        raise RuntimeError(f"skeletonize: {int((~inside).sum())} nodes lie outside their body")
    ids, total = out.lengths()
    log.info("skeletons: %d bodies, %d nodes, %.1f um in all (dust threshold %d voxels)",
             len(ids), len(out.nodes), total.sum() / 1000, cfg.dust_threshold)
    return out


def skeletonize_volume(volume: str | Path, out: str | Path, cfg: SkeletonConfig | None = None
                       ) -> Skeletons:
    """The skeletonize step: ``volume``'s ``labels`` (zarr, with ``voxel_size`` in its
    attributes) -> ``out`` (.npz). Errors name the volume when it has no labels."""
    import zarr

    from tokenunify.io.zarrio import require_complete

    root = zarr.open_group(str(volume), mode="r")
    if "labels" not in root:
        raise ValueError(f"{volume}: no 'labels' array to skeletonize (only datasets with "
                         f"ground truth are scored)")
    labels = root["labels"]
    require_complete(labels, "skeletonize")
    vs = labels.attrs.get("voxel_size")
    if vs is None:
        raise ValueError(f"{volume}/labels: no 'voxel_size' attribute (nm, z y x)")
    sk = skeletonize(np.asarray(labels[:]), vs, cfg)
    sk.save(out)
    return sk
