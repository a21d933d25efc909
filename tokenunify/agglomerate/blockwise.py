"""The agglomerate stage: affinities.zarr -> segmentation.zarr, blockwise (default) or whole.

Blockwise steps, each a set of Dask tasks over the block grid with a done marker per block, so a
rerun after a crash redoes only what is missing (state lives in ``segmentation.zarr.partial``):

1. ``fragments``: per block, tile fragments with local ids (``fragments.py``), written to the
   ``fragments_local`` array, and a count per tile.
2. ``offsets``: the counts of all tiles -> global id offsets (tile raster order).
3. ``edges``: per block, edge statistics of its core plus a low-side one-voxel shell
   (``graph.py``); every affinity sample is counted once.
4. ``agglomerate``: one global merge of the fragment graph (``merge.py``) up to the largest
   threshold; the merge history is stored in the ``graph`` group.
5. ``relabel``: per block, fragments -> segments through one lookup table per threshold.

Memory per task is bounded by the block (plus context); the global step holds only the graph.
``method: waterz`` runs ``waterz.agglomerate`` on the whole volume instead (``whole_volume.py``).

Batches (``batch_blocks``, :mod:`tokenunify.cluster`): ``run(..., phase=P, batch=i)`` runs phase
P (``fragments``, ``edges``, ``relabel``) for batch i only, or the global ``merge``, finishing
any earlier phase's missing blocks first; the workflow makes one job per batch and phase. With
``hierarchy``, phases ``levelK`` (level K going up) and ``downK`` (the segment ids going down
from level K, from the root's level to 1) run batch i of the level's nodes, and ``merge`` only
checks that every level is done. The
call without ``phase`` finishes everything and renames the result into place. The Dask tasks run
on ``dask``'s cluster (local threads/processes, a scheduler address or a SLURMCluster).
Output: one uint64 array ``threshold_{t:.3f}`` per threshold, plus ``fragments``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tokenunify.affinities import OFFSETS
from tokenunify.agglomerate import down
from tokenunify.agglomerate import fragments as fr
from tokenunify.agglomerate import levels as lv
from tokenunify.agglomerate.graph import block_edges, reduce_edges, reduce_histograms, stitch
from tokenunify.agglomerate.merge import NODE_RULE, TIES, MergeHistory, agglomerate_graph
from tokenunify.agglomerate.scoring import parse
from tokenunify.agglomerate.whole_volume import named_fragments, waterz_segmentations
from tokenunify.cluster import DaskConfig, batch_of, dask_client, hierarchy_phase
from tokenunify.heap import block_task
from tokenunify.io.identity import Lineage, result_settings
from tokenunify.io.locks import exclusive
from tokenunify.io.zarrio import (
    StagedOutput,
    blocks,
    create_array,
    create_volume,
    mark_done,
    marker_path,
    provenance,
    require_complete,
    writable,
)
from tokenunify.settings import defaults, from_section

log = logging.getLogger(__name__)


_DEFAULTS = defaults("agglomerate")


@dataclass
class AgglomerateConfig:
    """Settings of the agglomerate stage (config section ``agglomerate``).

    thresholds: merge thresholds in [0, 1]. scoring: waterz scoring function. method:
    'blockwise' or 'waterz' (whole volume). fragments: 'maxima_distance' (official seeded
    watershed per section), 'waterz' (waterz's 3-D watershed on the affinity graph) or
    'maxima_distance_3d' (the seeded watershed in 3-D); the 3-D ones blockwise in 3-D tiles of
    tile_z sections. tile, context: fragment tile edge (y and x) and context
    (voxels; y and x, and z for 3-D tiles). tile_z: depth of 3-D tiles.
    block: (z, y, x) voxels per task; y and x multiples of tile (z of tile_z for 3-D tiles).
    workers: parallel tasks. scheduler: local Dask scheduler, 'threads', 'processes' or
    'synchronous'. dask: the cluster (:class:`tokenunify.cluster.DaskConfig`; with ``local`` the
    scheduler above). batch_blocks: blocks per Snakemake job (None: one job).
    discretize_queue: waterz's queue binning (method waterz only). stitch_threshold: fragments
    split by a tile edge are joined first when the mean affinity across the cut is at least this
    (None: never), so that they enter the merge as the one fragment they would have been.
    hierarchy: None (one global merge) or children per node (z, y, x) of the hierarchical merge
    (:mod:`tokenunify.agglomerate.levels`).
    """

    thresholds: tuple = _DEFAULTS["thresholds"]
    scoring: str = _DEFAULTS["scoring"]
    method: str = _DEFAULTS["method"]
    fragments: str = _DEFAULTS["fragments"]
    tile: int = _DEFAULTS["tile"]
    context: int = _DEFAULTS["context"]
    tile_z: int = _DEFAULTS["tile_z"]
    block: tuple = _DEFAULTS["block"]
    workers: int = _DEFAULTS["workers"]
    scheduler: str = _DEFAULTS["scheduler"]
    discretize_queue: int = _DEFAULTS["discretize_queue"]
    stitch_threshold: float | None = _DEFAULTS["stitch_threshold"]
    hierarchy: tuple | None = _DEFAULTS["hierarchy"]
    dask: DaskConfig = field(default_factory=DaskConfig)
    batch_blocks: int | None = _DEFAULTS["batch_blocks"]

    def __post_init__(self):
        # single values are checked by the schema (tokenunify.settings.from_section); here:
        # the scoring's grammar, and what spans several fields
        if not isinstance(self.dask, DaskConfig):
            self.dask = from_section(DaskConfig, self.dask, ("agglomerate", "dask"))
        self.thresholds = tuple(sorted(float(t) for t in self.thresholds))
        self.block = tuple(int(b) for b in self.block)
        parse(self.scoring)
        if self.method == "blockwise" and any(b % self.tile for b in self.block[1:]):
            raise ValueError(f"agglomerate.block {list(self.block)}: y and x must be multiples "
                             f"of agglomerate.tile ({self.tile}), so that fragments do not "
                             f"depend on the block grid")
        if self.hierarchy is not None:
            self.hierarchy = tuple(int(f) for f in self.hierarchy)
            lv.level_grids((1, 1, 1), self.hierarchy)  # checks the fan-out
            if self.method != "blockwise":
                raise ValueError("agglomerate.hierarchy works with method 'blockwise' only")
        if self.method == "blockwise" and self.block[0] % self.tile_depth:
            raise ValueError(f"agglomerate.block {list(self.block)}: z must be a multiple of "
                             f"agglomerate.tile_z ({self.tile_z}) with fragments "
                             f"'{self.fragments}' (3-D tiles), so "
                             f"that fragments do not depend on the block grid")

    @property
    def tile_depth(self) -> int:
        """Sections per fragment tile: tile_z for 3-D tiles (fragments 'waterz' or
        'maxima_distance_3d'), else 1."""
        return self.tile_z if self.fragments in fr.VOLUME_FRAGMENTS else 1


def read_affinities(path: str | Path) -> tuple[zarr.Array, float]:
    """Open ``affinities`` of an affinities.zarr and check it; returns (array, scale)."""
    path = Path(path)
    try:
        arr = zarr.open_group(str(path), mode="r")["affinities"]
    except (FileNotFoundError, KeyError) as exc:
        raise ValueError(f"{path}: no 'affinities' array ({exc})") from None
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise ValueError(f"{path}/affinities: shape {arr.shape}, expected (3, z, y, x)")
    offs = arr.attrs.get("offsets")
    if offs is not None and [tuple(map(int, o)) for o in offs] != list(OFFSETS):
        raise ValueError(f"{path}/affinities: attribute offsets {offs} do not match the "
                         f"pipeline's convention {OFFSETS}")
    order = arr.attrs.get("channel_order")
    if order is not None and list(order) != ["z", "y", "x"]:
        raise ValueError(f"{path}/affinities: channel_order {order}, expected ['z', 'y', 'x']")
    if len(arr.attrs.get("voxel_size", [1, 1, 1])) != 3:
        raise ValueError(f"{path}/affinities: voxel_size must have 3 entries (z, y, x)")
    require_complete(arr, "agglomerate")
    scale = float(arr.attrs.get("scale", 255.0 if arr.dtype == np.uint8 else 1.0))
    return arr, scale


def _float(a: np.ndarray, scale: float) -> np.ndarray:
    return a.astype(np.float32) / np.float32(scale) if scale != 1.0 else a.astype(np.float32)


@block_task
def _fragments_task(aff_path, scale, out, work, idx, box, tile, context, tile_z=1,
                    method="maxima_distance"):
    aff = zarr.open_group(aff_path, mode="r")["affinities"]
    D, H, W = aff.shape[1:]
    (zs, ys, xs) = box
    z0, z1 = (zs.start, zs.stop) if tile_z == 1 else (max(0, zs.start - context),
                                                      min(D, zs.stop + context))
    y0, x0 = max(0, ys.start - context), max(0, xs.start - context)
    y1, x1 = min(H, ys.stop + context), min(W, xs.stop + context)
    a = _float(aff[:, z0:z1, y0:y1, x0:x1], scale)
    core = tuple(s.stop - s.start for s in box)
    if tile_z == 1:
        local, counts = fr.block_fragments(a, (ys.start - y0, xs.start - x0), core[1:], tile,
                                           context)
    else:
        local, counts = fr.block_fragments_3d(a, (zs.start - z0, ys.start - y0, xs.start - x0),
                                              core, tile, tile_z, context, method)
    writable(zarr.open_group(out, mode="r+")["fragments_local"])[box] = local
    np.save(Path(work) / "counts" / ("_".join(map(str, idx)) + ".npy"), counts)
    mark_done(work, "fragments", idx)


def _global_fragments(out, offsets, box, tile, shell=(0, 0, 0), tile_z=1) -> np.ndarray:
    lo = [s.start - h for s, h in zip(box, shell, strict=True)]
    loc = zarr.open_group(out, mode="r")["fragments_local"][
        tuple(slice(a, s.stop) for a, s in zip(lo, box, strict=True))]
    return fr.globalize(loc, offsets, lo[0], lo[1], lo[2], tile, tile_z)


@block_task
def _edges_task(aff_path, scale, out, work, idx, box, tile, offsets, hist_bins, tile_z=1):
    shell = tuple(int(s.start > 0) for s in box)
    frag = _global_fragments(out, offsets, box, tile, shell, tile_z)
    aff = _float(zarr.open_group(aff_path, mode="r")["affinities"][(slice(None),) + box], scale)
    origin = tuple(s.start for s in box)
    edges, hist = block_edges(frag, aff, shell, hist_bins, origin, tile,
                              tile_z if tile_z > 1 else None)
    name = "_".join(map(str, idx))
    edges.to_parquet(Path(work) / "edges" / f"{name}.parquet")
    if hist is not None:
        hist.to_parquet(Path(work) / "edges" / f"{name}.hist.parquet")
    mark_done(work, "edges", idx)


@block_task
def _level_task(work, level, node, grids, fanout, frag_blocks, scoring, thresholds,
                stitch_threshold):
    lv.node_task(work, level, node, grids, fanout, frag_blocks, scoring, thresholds,
                 stitch_threshold)
    mark_done(work, f"level{level}", node)


@block_task
def _down_task(work, level, node, grids, fanout, thresholds):
    down.down_task(work, level, node, grids, fanout, thresholds)
    mark_done(work, f"down{level}", node)


LUT_CHUNK = 1 << 20  # fragment ids per chunk of the on-disk lookup tables


def _write_luts(work: Path, history: MergeHistory, thresholds) -> None:
    """Fragment -> segment tables, one row per threshold, into ``work/luts.zarr`` (uint64,
    chunks of :data:`LUT_CHUNK` ids), so that a relabel task reads only the ids of its block."""
    path, tmp = work / "luts.zarr", work / f"luts.{os.getpid()}.tmp.zarr"
    n = history.n_fragments + 1
    arr = create_array(zarr.open_group(str(tmp), mode="w"), "luts", shape=(len(thresholds), n),
                       chunks=(1, min(n, LUT_CHUNK)), dtype=np.uint64, fill_value=0)
    for k, t in enumerate(thresholds):
        arr[k] = history.lut(t)
    try:  # only a complete table is ever renamed into place
        os.rename(tmp, path)
    except OSError:  # another process of the same merge got there first (the same tables)
        shutil.rmtree(tmp, ignore_errors=True)


@block_task
def _relabel_task(out, work, idx, box, tile, offsets, names, tile_z=1, levels=None,
                  thresholds=None):
    """Segment ids of one block: from the flat merge's lookup tables, or with ``levels`` (the
    hierarchy's level count) from the block's leaf and what its parent resolved."""
    frag = _global_fragments(out, offsets, box, tile, tile_z=tile_z)
    ids, inverse = np.unique(frag, return_inverse=True)
    if levels is None:
        luts = zarr.open_group(str(Path(work) / "luts.zarr"), mode="r")["luts"]
        table = luts.get_orthogonal_selection((slice(None), ids.astype(np.int64)))  # (T, ids)
    else:
        nz = ids != 0
        table = np.zeros((len(names), len(ids)), np.uint64)
        table[:, nz] = down.leaf_ids(work, idx, ids[nz].astype(np.int64), levels, thresholds)
    root = zarr.open_group(out, mode="r+")
    for k, name in enumerate(names):
        writable(root[name])[box] = table[k][inverse].reshape(frag.shape)
    writable(root["fragments"])[box] = frag
    mark_done(work, "relabel", idx)


def _compute(tasks, cfg: AgglomerateConfig, desc: str, client=None) -> None:
    """Run dask.delayed tasks on ``client`` (a cluster) or the configured local scheduler."""
    import dask

    if not tasks:
        return
    t0 = time.perf_counter()
    if client is None:
        dask.compute(*tasks, scheduler=cfg.scheduler, num_workers=cfg.workers)
    else:
        client.compute(list(tasks), sync=True)
    log.info("%s: %d blocks in %.1f s", desc, len(tasks), time.perf_counter() - t0)


def threshold_name(t: float) -> str:
    """Array name of the segmentation at threshold t."""
    return f"threshold_{t:.3f}"


PHASES = ("fragments", "edges", "merge", "relabel")


class _Blockwise:
    """The blockwise phases over ``stage`` (the staging folder); see the module docstring."""

    def __init__(self, aff_path: str, scale: float, shape, stage: Path, cfg: AgglomerateConfig,
                 connect=None):
        """``connect()``: the Dask client (None: the local scheduler), called at the first
        step that has tasks, so that nothing is started when every block is done."""
        self.aff_path, self.scale, self.shape, self.cfg = aff_path, scale, shape, cfg
        self.out, self.work = str(stage), stage / ".work"
        for sub in ("counts", "edges"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.grid = list(blocks(shape, cfg.block))
        self.scoring = parse(cfg.scoring)
        self.client, self.connect = None, connect

    def _run(self, tasks: list, desc: str) -> None:
        if tasks and self.connect is not None:
            self.client, self.connect = self.connect(), None
        _compute(tasks, self.cfg, desc, self.client)

    def _todo(self, kind: str, subset) -> list:
        return [(i, b) for i, b in subset if not marker_path(self.work, kind, i).exists()]

    def fragments(self, subset) -> None:
        from dask import delayed

        c = self.cfg
        self._run([delayed(_fragments_task, pure=False)(self.aff_path, self.scale, self.out,
                                                       str(self.work), i, b, c.tile, c.context,
                                                       c.tile_depth, c.fragments)
                  for i, b in self._todo("fragments", subset)], "fragments")

    def offsets(self) -> tuple[np.ndarray, int]:
        """Global id offsets per tile and the fragment count (needs every block's fragments).
        Computed once from the per-block counts and kept in ``.work/offsets.npz`` for the
        other jobs (concurrent writers write the same file, replaced atomically)."""
        saved = self.work / "offsets.npz"
        if saved.exists():
            with np.load(saved) as f:
                return f["offsets"], int(f["n"])
        self.fragments(self.grid)
        tile, tz = self.cfg.tile, self.cfg.tile_depth
        ty, tx = fr.tile_grid(self.shape[1:], tile)
        counts = np.zeros((-(-self.shape[0] // tz), ty, tx), np.int64)
        for i, (zs, ys, xs) in self.grid:
            c = np.load(self.work / "counts" / ("_".join(map(str, i)) + ".npy"))
            counts[zs.start // tz:zs.start // tz + c.shape[0],
                   ys.start // tile:ys.start // tile + c.shape[1],
                   xs.start // tile:xs.start // tile + c.shape[2]] = c
        offsets, n = fr.tile_offsets(counts), int(counts.sum())
        tmp = self.work / f"offsets.{os.getpid()}.tmp.npz"
        np.savez(tmp, offsets=offsets, n=n)
        tmp.replace(saved)
        return offsets, n

    def edges(self, subset) -> None:
        from dask import delayed

        offsets, _ = self.offsets()
        bins = self.scoring.bins if self.scoring.needs_histogram else None
        self._run([delayed(_edges_task, pure=False)(self.aff_path, self.scale, self.out,
                                                   str(self.work), i, b, self.cfg.tile, offsets,
                                                   bins, self.cfg.tile_depth)
                  for i, b in self._todo("edges", subset)], "edges")

    def merged(self) -> bool:
        """Whether the merge is done (its lookup tables, or the hierarchy's segment ids going
        down, are on disk)."""
        return (self.work / ("down.done" if self.cfg.hierarchy is not None
                             else "history.npz")).exists()

    def merge(self) -> MergeHistory | None:
        """The merge, once. Flat: one global merge in this process; its lookup tables go to
        ``.work/luts.zarr`` for the relabel batches, then the history to
        ``.work/history.npz`` (which marks the merge done) for the final job, which is
        returned. Hierarchy: every level up, then the segment ids down (``.work/down.done``
        marks it); returns None (the history stays in the nodes' files)."""
        if self.cfg.hierarchy is not None:
            if not self.merged():
                top = len(self.level_nodes()) - 1
                self.level(top)
                if top >= 1:
                    self.down(1)
                (self.work / "down.done").touch()
            return None
        saved = self.work / "history.npz"
        if saved.exists():
            with np.load(saved) as h:
                return MergeHistory(h["u"], h["v"], h["level"], int(h["n"]), h["pre"])
        offsets, n_frag = self.offsets()
        self.edges(self.grid)
        history = self._global_merge(n_frag)
        _write_luts(self.work, history, self.cfg.thresholds)
        tmp = self.work / f"history.{os.getpid()}.tmp.npz"
        np.savez(tmp, u=history.u, v=history.v, level=history.level, n=history.n_fragments,
                 pre=history.pre)
        tmp.replace(saved)
        return history

    def _global_merge(self, n_frag: int) -> MergeHistory:
        """Every block's edges reduced into one graph, stitched, and merged in this process."""
        work, hist_bins = self.work, self.scoring.needs_histogram
        edges = reduce_edges([pd.read_parquet(p) for p in sorted((work / "edges").glob("*_*.parquet"))
                              if not p.name.endswith(".hist.parquet")])
        hist = (reduce_histograms([pd.read_parquet(p) for p in
                                   sorted((work / "edges").glob("*.hist.parquet"))])
                if hist_bins else None)
        log.info("fragment graph: %d fragments, %d edges", n_frag, len(edges))
        pre, edges, hist = stitch(edges, n_frag, self.cfg.stitch_threshold, hist)
        log.info("stitching across tile edges: %d fragments in %d groups, %d edges",
                 n_frag, len(np.unique(pre)) - 1, len(edges))
        history = agglomerate_graph(edges, n_frag, self.scoring, max(self.cfg.thresholds), hist)
        history.pre = pre
        return history

    def level_nodes(self) -> list[list]:
        """The nodes (z, y, x) of every level of the hierarchy, in raster order."""
        import itertools

        grid0 = tuple(max(i[k] for i, _ in self.grid) + 1 for k in range(3))
        return [list(itertools.product(*(range(g) for g in grid)))
                for grid in lv.level_grids(grid0, self.cfg.hierarchy)]

    def level(self, level: int, batch: int | None = None) -> None:
        """Level ``level`` of the hierarchical merge for batch ``batch`` of its nodes (None:
        all), after finishing whatever the levels below still miss; nodes with a done marker
        are skipped (:mod:`tokenunify.agglomerate.levels`)."""
        from dask import delayed

        c = self.cfg
        nodes = self.level_nodes()
        if not 0 <= level < len(nodes):
            raise ValueError(f"agglomerate phase level{level}: the hierarchy has levels 0.."
                             f"{len(nodes) - 1}")
        if level == 0:
            offsets, n_frag = self.offsets()
            self.edges(self.grid)
        else:
            self.level(level - 1)
            offsets, n_frag = self.offsets()
        grids = self._grids()
        frag_blocks = lv.FragmentBlocks(offsets, c.tile, c.tile_depth, c.block, n_frag)
        subset = batch_of(nodes[level], batch, c.batch_blocks)
        todo = [n for n in subset if not marker_path(self.work, f"level{level}", n).exists()]
        self._run([delayed(_level_task, pure=False)(str(self.work), level, n, grids,
                                                   c.hierarchy, frag_blocks, self.scoring,
                                                   c.thresholds, c.stitch_threshold)
                   for n in todo], f"merge level {level}")

    def _grids(self) -> list[tuple[int, int, int]]:
        return [tuple(max(n[k] for n in ns) + 1 for k in range(3)) for ns in self.level_nodes()]

    def down(self, level: int, batch: int | None = None) -> None:
        """The segment ids going down to level ``level`` - 1 for batch ``batch`` of the nodes of
        level ``level`` (None: all; 1 <= level <= the root's level), after everything above:
        the levels up and the down steps of the levels above; one task per node
        (:func:`tokenunify.agglomerate.down.down_task`), nodes with a done marker skipped. The
        leaves' ids are resolved by the relabel tasks."""
        from dask import delayed

        c, nodes = self.cfg, self.level_nodes()
        top = len(nodes) - 1
        if not 1 <= level <= top:
            raise ValueError(f"agglomerate phase down{level}: the hierarchy's segment ids go "
                             f"down levels {top}..1" if top else
                             f"agglomerate phase down{level}: the hierarchy has one level "
                             f"(one block), nothing goes down")
        if level == top:
            self.level(top)
        else:
            self.down(level + 1)
        grids = self._grids()
        subset = batch_of(nodes[level], batch, c.batch_blocks)
        todo = [n for n in subset if not marker_path(self.work, f"down{level}", n).exists()]
        self._run([delayed(_down_task, pure=False)(str(self.work), level, n, grids,
                                                  c.hierarchy, c.thresholds)
                   for n in todo], f"segment ids down level {level}")

    def relabel(self, subset) -> None:
        """Segment ids of the blocks of ``subset``: each task reads the lookup-table entries of
        its own fragment ids only (the merge history is not loaded)."""
        from dask import delayed

        if not self.merged():
            self.merge()
        offsets, _ = self.offsets()
        names = [threshold_name(t) for t in self.cfg.thresholds]
        levels = len(self.level_nodes()) if self.cfg.hierarchy is not None else None
        self._run([delayed(_relabel_task, pure=False)(self.out, str(self.work), i, b,
                                                     self.cfg.tile, offsets, names,
                                                     self.cfg.tile_depth, levels,
                                                     self.cfg.thresholds)
                  for i, b in self._todo("relabel", subset)], "relabel")


def run(affinities: str | Path, out: str | Path, cfg: AgglomerateConfig | None = None,
        phase: str | None = None, batch: int | None = None) -> Path:
    """Agglomerate ``affinities`` (an affinities.zarr) into ``out`` (segmentation.zarr).

    ``phase`` (one of :data:`PHASES`) with ``batch`` (None: all blocks) runs that phase only,
    into the staging folder, and returns its path; without ``phase`` everything left is done
    and ``out`` is committed."""
    cfg = cfg or AgglomerateConfig()
    kind, level = (hierarchy_phase(phase) if phase is not None else None) or (None, None)
    if kind is not None:
        if cfg.hierarchy is None:
            raise ValueError(f"agglomerate phase {phase!r} needs agglomerate.hierarchy")
    elif phase is not None and (phase not in PHASES or cfg.method != "blockwise"):
        raise ValueError(f"agglomerate phase {phase!r}: phases {list(PHASES)} (and levelK, "
                         f"downK with agglomerate.hierarchy) exist for method blockwise only "
                         f"(method is {cfg.method!r})")
    aff, scale = read_affinities(affinities)
    shape = aff.shape[1:]
    vs, off = aff.attrs.get("voxel_size", [1.0] * 3), aff.attrs.get("offset", [0.0] * 3)
    settings = result_settings(asdict(cfg))
    settings["ties"] = TIES  # a staging folder merged with other tie rules is never resumed
    if cfg.hierarchy:
        settings["node_rule"] = NODE_RULE
    lineage = Lineage.of("agglomerate", {"cfg": settings, "shape": list(shape)},
                         {"affinities": affinities})
    block = tuple(min(b, n) for b, n in zip(cfg.block, shape, strict=True))
    names = [threshold_name(t) for t in cfg.thresholds]
    with exclusive(out):  # batch jobs of this stage may start together
        stage = StagedOutput(out, lineage)
        root = zarr.open_group(str(stage.path), mode="a", zarr_format=3)
        for name in names + ["fragments"]:
            create_volume(root, name, shape, block, np.uint64, vs, off)
        if cfg.method == "blockwise":
            create_volume(root, "fragments_local", shape, block, np.uint32, vs, off)
    if cfg.method == "waterz":
        a = _float(aff[:], scale)
        frag = named_fragments(a, cfg.fragments)
        for t, seg in waterz_segmentations(a, cfg.thresholds, cfg.scoring, frag,
                                           cfg.discretize_queue).items():
            writable(root[threshold_name(t)])[:] = seg
        if frag is not None:  # waterz's own fragments stay inside waterz
            writable(root["fragments"])[:] = frag
    else:
        grid = list(blocks(shape, cfg.block))
        subset = batch_of(grid, batch, cfg.batch_blocks)
        with ExitStack() as stack:
            bw = _Blockwise(str(affinities), scale, shape, stage.path, cfg, connect=lambda: (
                stack.enter_context(dask_client(cfg.dask, len(subset), "agglomerate"))))
            if phase == "merge":
                bw.merge()
            elif level is not None:
                getattr(bw, kind)(level, batch)
            elif phase is not None:
                getattr(bw, phase)(subset)
            if phase is not None:
                return stage.path
            bw.relabel(grid)
            history = bw.merge()  # done: read back for the output's merge graph
            del root["fragments_local"]
            g = root.require_group("graph")
            if history is None:  # the hierarchy: node by node
                n_frag = bw.offsets()[1]
                down.write_graph(g, stage.path / ".work", bw._grids(), n_frag)
            else:
                n_frag = history.n_fragments
                for k in ("u", "v", "level", "pre"):
                    data = getattr(history, k)
                    if k in g:
                        del g[k]
                    create_array(g, k, shape=data.shape, dtype=data.dtype,
                                 chunks=(max(1, len(data)),))[:] = data
        g.attrs.update({"description": "merge history: fragment u absorbed v at level (score); "
                                       "pre: fragment -> stitched representative (applied first)",
                        "n_fragments": n_frag})
    root.attrs.update({"thresholds": list(cfg.thresholds), "arrays": names,
                       "scoring": cfg.scoring, "method": cfg.method,
                       "fragments": cfg.fragments, "tile": cfg.tile, "tile_z": cfg.tile_depth,
                       "context": cfg.context,
                       "voxel_size": list(vs), "offset": list(off),
                       "provenance": provenance("agglomerate", lineage, [str(affinities)])})
    shutil.rmtree(stage.path / ".work", ignore_errors=True)
    return stage.commit()
