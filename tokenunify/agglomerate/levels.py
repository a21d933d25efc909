"""The hierarchical merge on disk (``agglomerate.hierarchy``): one Dask task per node and level,
so that no process holds the whole fragment graph.

Level 0 is the block grid of the edges phase; a node of level k + 1 groups ``hierarchy``
(z, y, x) nodes of level k (the last ones clipped), up to a single root. A node reads

- level 0: its block's edge table (and histograms), plus the edges that its face neighbours
  (+z, +y, +x) sampled across its high faces;
- level k > 0: its children's outputs,

splits them into the edges inside the node and those that leave it, runs
:func:`tokenunify.agglomerate.merge.merge_node` with the segments of the leaving edges
frozen, and writes its merges and its output (residual plus leaving edges) as parquet files in
``.work/levels``, then a done marker. A rerun skips the nodes that have one, so a killed level
resumes where it stopped. Memory per task: the node's residual graph, which is what touches its
faces (all of a frozen segment's live edges), never the whole graph.

Edge tables (parquet): ``u, v`` (current segment ids, u < v), ``k0, k1`` (the key: the
smallest original fragment pair among the edge's parts), ``score``, ``stale``, and ``count,
sum`` (mean scoring) or a histogram table ``k0, k1, bin, n`` (quantile scoring).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tokenunify.agglomerate.merge import MergeHistory, NodeGraph, merge_node
from tokenunify.agglomerate.scoring import Scoring, discretize

log = logging.getLogger(__name__)


def level_grids(block_grid, fanout) -> list[tuple[int, int, int]]:
    """Node grids (z, y, x counts) of every level, from the block grid up to (1, 1, 1)."""
    if len(fanout) != 3 or any(int(f) < 1 for f in fanout) or all(int(f) == 1 for f in fanout):
        raise ValueError(f"agglomerate.hierarchy {list(fanout)}: give children per node along "
                         f"z, y and x, each >= 1 and not all 1 (for example [2, 2, 2])")
    grids = [tuple(int(g) for g in block_grid)]
    stuck = [ax for ax, (g, f) in enumerate(zip(grids[0], fanout, strict=True))
             if g > 1 and int(f) == 1]
    if stuck:
        ax = stuck[0]
        raise ValueError(f"agglomerate.hierarchy {list(fanout)}: {'zyx'[ax]} has "
                         f"{grids[0][ax]} blocks but 1 child per node, so the levels never reach "
                         f"one root; give it at least 2")
    while grids[-1] != (1, 1, 1):
        grids.append(tuple(-(-g // int(f)) for g, f in zip(grids[-1], fanout, strict=True)))
    return grids


class FragmentBlocks:
    """Fragment id -> block coordinates, from the per-tile id offsets of the fragments phase.

    ``offsets`` (TZ, TY, TX): ids before each tile in raster order; a tile covers ``tile_z``
    sections and ``tile`` voxels in y and x; blocks are multiples of tiles."""

    def __init__(self, offsets: np.ndarray, tile: int, tile_z: int, block, n_fragments: int):
        self.shape = offsets.shape
        self.flat = offsets.astype(np.int64).ravel()
        self.per_block = np.array([block[0] // tile_z, block[1] // tile, block[2] // tile])
        self.n = n_fragments

    def __call__(self, ids) -> np.ndarray:
        """(N, 3) int64 block coordinates of fragment ids (1..n_fragments)."""
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < 1 or ids.max() > self.n):
            bad = int(ids.max()) if ids.max() > self.n else int(ids.min())
            raise ValueError(f"fragment id {bad} is outside 1..{self.n} (the fragment count)")
        tile = np.searchsorted(self.flat, ids, side="left") - 1
        coords = np.stack(np.unravel_index(tile, self.shape), axis=1)
        return coords // self.per_block


def _name(level: int, node) -> str:
    return f"{level}_" + "_".join(str(int(i)) for i in node)


def _to_frames(g: NodeGraph, scoring: Scoring) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    k0 = [k[0] for k in g.key]
    k1 = [k[1] for k in g.key]
    df = pd.DataFrame({"u": np.asarray(g.u, np.int64), "v": np.asarray(g.v, np.int64),
                       "k0": np.asarray(k0, np.int64), "k1": np.asarray(k1, np.int64),
                       "score": np.asarray(g.score, np.float64),
                       "stale": np.asarray(g.stale, bool)})
    if scoring.kind == "mean":
        df["sum"] = np.asarray([s[0] for s in g.state], np.float64)
        df["count"] = np.asarray([s[1] for s in g.state], np.int64)
        return df, None
    rows = [(a, b, int(bn), int(n)) for a, b, st in zip(k0, k1, g.state, strict=True)
            for bn, n in st.items()]
    hist = pd.DataFrame(rows, columns=["k0", "k1", "bin", "n"]).astype(np.int64)
    return df, hist


def _from_frames(df: pd.DataFrame, hist: pd.DataFrame | None, scoring: Scoring) -> NodeGraph:
    g = NodeGraph()
    keys = list(zip(df["k0"].tolist(), df["k1"].tolist(), strict=True))
    if scoring.kind == "mean":
        states = [[float(s), int(c)] for s, c in zip(df["sum"].tolist(), df["count"].tolist(),
                                                    strict=True)]
    else:
        by_key: dict = {}
        for a, b, bn, n in hist[["k0", "k1", "bin", "n"]].itertuples(index=False):
            by_key.setdefault((a, b), {})[bn] = n
        states = [by_key[k] for k in keys]
    for u, v, k, st, sc, stale in zip(df["u"].tolist(), df["v"].tolist(), keys, states,
                                      df["score"].tolist(), df["stale"].tolist(), strict=True):
        g.add(int(u), int(v), k, st, float(sc), bool(stale))
    return g


def _leaf_frames(edges: pd.DataFrame, hist: pd.DataFrame | None, scoring: Scoring
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A reduced edge table (u < v, count, sum, max) as a level table, vectorised: the key is
    the pair itself, every edge fresh, scored as :class:`~tokenunify.agglomerate.scoring.
    Scoring` scores its initial state."""
    u, v = edges["u"].to_numpy(np.int64), edges["v"].to_numpy(np.int64)
    df = pd.DataFrame({"u": u, "v": v, "k0": u, "k1": v})
    if scoring.kind == "mean":
        total, count = edges["sum"].to_numpy(np.float64), edges["count"].to_numpy(np.int64)
        df["score"] = 1.0 - total / count
        df["stale"] = False
        df["sum"], df["count"] = total, count
        return df, None
    if scoring.init_with_max:
        h = pd.DataFrame({"k0": u, "k1": v, "bin": discretize(edges["max"].to_numpy(),
                                                                scoring.bins),
                          "n": np.ones(len(u), np.int64)})
    else:
        h = hist.rename(columns={"u": "k0", "v": "k1"})[["k0", "k1", "bin", "n"]]
    h = h.sort_values(["k0", "k1", "bin"]).reset_index(drop=True)
    # the quantile: the first bin whose running count reaches Q * total // 100 + 1
    grp = h.groupby(["k0", "k1"], sort=False)["n"]
    total = grp.transform("sum").to_numpy()
    run = grp.cumsum().to_numpy()
    hit = run >= scoring.quantile * total // 100 + 1
    first = h[hit].drop_duplicates(["k0", "k1"])
    q = pd.DataFrame({"k0": first["k0"], "k1": first["k1"],
                      "score": 1.0 - (first["bin"].to_numpy() + 0.5) / scoring.bins})
    df = df.merge(q, on=["k0", "k1"], how="left")
    # no bin reaches the pivot (quantile 100): the top bin, as Scoring.score says
    df["score"] = df["score"].fillna(1.0 - (scoring.bins - 0.5) / scoring.bins)
    df["stale"] = False
    return df, h.astype(np.int64)


def _block_graph(edges_dir: Path, idx, grid, scoring: Scoring, n_fragments: int
                 ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A leaf's edges as a level table: its own edge table and, from its +z, +y and +x face
    neighbours' tables, the edges those sampled across its high faces (to be told apart by the
    caller: only edges touching this block's fragments are kept there)."""
    frames, hists = [], []
    for d in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        j = tuple(int(i) + k for i, k in zip(idx, d, strict=True))
        if any(a >= g for a, g in zip(j, grid, strict=True)):
            continue
        name = "_".join(map(str, j))
        path = edges_dir / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path}: the edge table of block {list(j)} is missing "
                                    f"(rerun the edges phase)")
        e = pd.read_parquet(path)
        bad = e[(e["u"] < 1) | (e["v"] > n_fragments) | (e["u"] >= e["v"])]
        if len(bad):
            raise ValueError(f"{path}: the edge table of block {list(j)} has edge "
                             f"({int(bad['u'].iloc[0])}, {int(bad['v'].iloc[0])}); ids must "
                             f"satisfy 1 <= u < v <= {n_fragments} (the fragment count)")
        e["own"] = d == (0, 0, 0)
        frames.append(e)
        if scoring.needs_histogram:
            hists.append(pd.read_parquet(edges_dir / f"{name}.hist.parquet"))
    e = pd.concat(frames, ignore_index=True)
    return e, (pd.concat(hists, ignore_index=True) if hists else None)


def merge_frames(df: pd.DataFrame, hist: pd.DataFrame | None, frozen: set, scoring: Scoring,
                 max_threshold: float, engine: str = "auto"
                 ) -> tuple[list, pd.DataFrame, pd.DataFrame | None]:
    """:func:`~tokenunify.agglomerate.merge.merge_node` on a level table: (merges, residual
    table, residual histograms). Runs the compiled kernel (``merge_cpu.cpp``, the same one as
    the global merge) unless it is unavailable or ``engine`` is 'python'. ``frozen`` is read,
    not updated."""
    from tokenunify.agglomerate.merge import compiled_extension

    ext = None if engine == "python" else compiled_extension()
    if ext is None or len(df) == 0:
        merges, residual = merge_node(_from_frames(df, hist, scoring), frozen, scoring,
                                      max_threshold)
        rdf, rh = _to_frames(residual, scoring)
        return merges, rdf, rh
    import torch

    k0, k1 = df["k0"].to_numpy(np.int64), df["k1"].to_numpy(np.int64)
    if k0.max() >= 2**31 or k1.max() >= 2**31:
        raise ValueError(f"the compiled node merge takes fragment ids < 2^31, not {k1.max()}")
    key = (k0 << 32) | k1  # orders as the (k0, k1) pair
    # the node's segments renumbered 1..m, so that its memory follows its graph, not the ids
    seg, local = np.unique(np.concatenate([df["u"].to_numpy(np.int64),
                                           df["v"].to_numpy(np.int64)]), return_inverse=True)
    u, v = local[:len(df)] + 1, local[len(df):] + 1  # order kept: seg is sorted
    n = len(seg)
    hot = np.fromiter(frozen, np.int64, len(frozen)) if frozen else np.zeros(0, np.int64)
    hot = hot[np.isin(hot, seg)]
    mask = np.zeros(n + 1 if len(hot) else 0, np.uint8)  # empty: nothing frozen, no checks
    if len(hot):
        mask[np.searchsorted(seg, hot) + 1] = 1

    def t(a):
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))

    zi, zf = np.zeros(0, np.int64), np.zeros(0, np.float64)
    sums, counts, off, hbin, hcnt = zf, zi, np.zeros(len(df) + 1, np.int64), \
        np.zeros(0, np.int32), zi
    if scoring.kind == "mean":
        sums, counts = df["sum"].to_numpy(np.float64), df["count"].to_numpy(np.int64)
    else:
        rows = pd.DataFrame({"k0": k0, "k1": k1, "edge": np.arange(len(df))})
        h = hist.merge(rows, on=["k0", "k1"], how="inner").sort_values(["edge", "bin"])
        off[1:] = np.cumsum(np.bincount(h["edge"].to_numpy(), minlength=len(df)))
        hbin, hcnt = h["bin"].to_numpy(np.int32), h["n"].to_numpy(np.int64)
    out = ext.merge(t(u), t(v), 0 if scoring.kind == "mean" else 1, t(sums), t(counts), t(off),
                    t(hbin), t(hcnt), scoring.quantile, scoring.bins, n, float(max_threshold),
                    t(key), t(df["score"].to_numpy(np.float64)),
                    t(df["stale"].to_numpy().astype(np.uint8)), t(mask))
    out = [x.numpy() for x in out]
    back = np.concatenate([[0], seg])  # local id -> segment id
    merges = list(zip(back[out[0]].tolist(), back[out[1]].tolist(), out[2].tolist(),
                      strict=True))
    out[4], out[5] = back[out[4]], back[out[5]]
    rk = out[6]
    rdf = pd.DataFrame({"u": out[4], "v": out[5], "k0": rk >> 32, "k1": rk & (2**32 - 1),
                        "score": out[7], "stale": out[8].astype(bool)})
    if scoring.kind == "mean":
        rdf["sum"], rdf["count"] = out[9], out[10]
        return merges, rdf, None
    roff = out[9]
    lens = np.diff(roff)
    rh = pd.DataFrame({"k0": np.repeat(rdf["k0"].to_numpy(), lens),
                       "k1": np.repeat(rdf["k1"].to_numpy(), lens),
                       "bin": out[10].astype(np.int64), "n": out[11]})
    return merges, rdf, rh


def node_task(work: str, level: int, node, grids, fanout, frag_blocks: FragmentBlocks,
              scoring: Scoring, max_threshold: float) -> None:
    """Merge one node of one level (see the module docstring) and mark it done."""
    work = Path(work)
    out = work / "levels"
    node = tuple(int(i) for i in node)
    scale = np.array([int(f) ** level for f in fanout])

    def home(ids):
        if not len(ids):
            return np.zeros((0, 3), np.int64)
        try:
            return frag_blocks(ids) // scale
        except ValueError as exc:
            raise ValueError(f"level {level} node {list(node)}"
                             f"{' (block ' + str(list(node)) + ')' if level == 0 else ''}: "
                             f"{exc}") from exc

    if level == 0:
        raw, raw_hist = _block_graph(work / "edges", node, grids[0], scoring, frag_blocks.n)
        hu, hv = home(raw["u"].to_numpy()), home(raw["v"].to_numpy())
        mine_u = (hu == node).all(axis=1)
        mine_v = (hv == node).all(axis=1)
        raw = raw[(raw["own"].to_numpy() | mine_u | mine_v)]
        raw = raw.groupby(["u", "v"], as_index=False)[["count", "sum", "max"]].agg(
            {"count": "sum", "sum": "sum", "max": "max"})
        hist = None
        if raw_hist is not None:  # only the kept edges' histograms
            hist = raw_hist.merge(raw[["u", "v"]], on=["u", "v"])
            hist = hist.groupby(["u", "v", "bin"], as_index=False)["n"].sum()
        df, h = _leaf_frames(raw, hist, scoring)
    else:
        kids = [tuple(n * int(f) + i for n, f, i in zip(node, fanout, off, strict=True))
                for off in itertools.product(*(range(int(f)) for f in fanout))]
        kids = [k for k in kids if all(a < g for a, g in zip(k, grids[level - 1], strict=True))]
        dfs, hs = [], []
        for k in kids:
            base = out / _name(level - 1, k)
            if not Path(str(base) + ".parquet").exists():
                raise FileNotFoundError(f"{base}.parquet: the output of node {list(k)} of level "
                                        f"{level - 1} is missing (rerun that level)")
            dfs.append(pd.read_parquet(str(base) + ".parquet"))
            if scoring.kind != "mean":
                hs.append(pd.read_parquet(str(base) + ".hist.parquet"))
        # an edge between two children is in both outputs, unchanged (its ends are frozen)
        df = pd.concat(dfs, ignore_index=True).drop_duplicates(["k0", "k1"])
        h = (pd.concat(hs, ignore_index=True).drop_duplicates(["k0", "k1", "bin"])
             if hs else None)
    hu, hv = home(df["u"].to_numpy()), home(df["v"].to_numpy())
    inside = (hu == node).all(axis=1) & (hv == node).all(axis=1)
    leaving = df[~inside]
    frozen = set(leaving["u"].tolist()) | set(leaving["v"].tolist())
    merges, rdf, rh = merge_frames(df[inside].reset_index(drop=True), h, frozen, scoring,
                                   max_threshold)
    result = pd.concat([rdf, leaving[rdf.columns]], ignore_index=True)
    base = out / _name(level, node)
    out.mkdir(parents=True, exist_ok=True)
    if h is not None or scoring.kind != "mean":
        keys = leaving[["k0", "k1"]]
        lh = h.merge(keys, on=["k0", "k1"]) if h is not None else None
        hh = pd.concat([x for x in (rh, lh) if x is not None], ignore_index=True)
        hh.to_parquet(str(base) + ".hist.parquet")
    np.savez(str(base) + ".merges.npz", u=np.asarray([m[0] for m in merges], np.uint64),
             v=np.asarray([m[1] for m in merges], np.uint64),
             level=np.asarray([m[2] for m in merges], np.float64))
    result.to_parquet(str(base) + ".parquet")  # written last: its presence means done
    log.debug("level %d node %s: %d edges inside, %d leaving, %d merges, %d residual", level,
              node, int(inside.sum()), len(leaving), len(merges), len(rdf))


def collect(work: Path, grids, n_fragments: int) -> MergeHistory:
    """All nodes' merges as one history (order does not matter to the lookup tables)."""
    us, vs, ls = [], [], []
    for level, grid in enumerate(grids):
        for node in itertools.product(*(range(g) for g in grid)):
            with np.load(work / "levels" / (_name(level, node) + ".merges.npz")) as f:
                us.append(f["u"])
                vs.append(f["v"])
                ls.append(f["level"])
    cat = (lambda x, t: np.concatenate(x).astype(t) if x else np.zeros(0, t))  # noqa: E731
    return MergeHistory(cat(us, np.uint64), cat(vs, np.uint64), cat(ls, np.float64),
                        n_fragments)
