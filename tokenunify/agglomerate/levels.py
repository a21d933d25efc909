"""The hierarchical merge on disk (``agglomerate.hierarchy``): one Dask task per node and level,
so that no process holds the whole fragment graph.

Level 0 is the block grid of the edges phase; a node of level k + 1 groups ``hierarchy``
(z, y, x) nodes of level k (the last ones clipped), up to a single root. A node reads

- level 0: its block's edge table (and histograms), plus the edges that its face neighbours
  (+z, +y, +x) sampled across its high faces;
- level k > 0: its children's outputs,

joins the stitched groups it can complete, runs :func:`tokenunify.agglomerate.merge.merge_node`
on its graph edges with the segments of the edges that leave it frozen, and writes its merges
and its outputs as parquet files in ``.work/levels``, then a done marker. A rerun skips the
nodes that have one, so a killed level resumes where it stopped. Memory per task: what touches
the node's faces (all of a frozen segment's live edges), never the whole graph.

Stitching (``stitch_threshold``, as :func:`tokenunify.agglomerate.graph.stitch` in the flat
merge): the flat merge contracts each group of tile-split fragments into one before merging
(counts and sums add, maxima take the max, the key is the pair of representatives, the
smallest ids of the groups). A node knows a group completely only when none of its members has
a stitch pair leaving the node, so edges stay *raw* (per original fragment pair, statistics
unscored) until the node where both ends are inside and both groups complete; there they are
contracted onto the representatives and become graph edges, exactly the flat merge's. The
other raw edges go up unchanged and their ends are frozen. Open groups go up as (fragment,
representative) rows; each node records the groups it completed, which give the history's
``pre``.

Outputs per node: ``NAME.parquet``: the residual graph edges, ``u, v`` (current segment ids,
u < v), ``k0, k1`` (the key: the smallest contracted fragment pair among the edge's parts),
``score``, ``stale``, and ``count, sum`` (mean scoring) or a histogram table
``NAME.hist.parquet`` (``k0, k1, bin, n``); ``NAME.raw.parquet``: raw edges (``u, v`` original
fragments, ``count, sum, max, cut_count, cut_sum``; ``NAME.rawhist.parquet`` with per-sample
histograms); ``NAME.groups.parquet``: (``fragment, rep``); ``NAME.merges.npz``: the merges, the
completed groups, the exported ids and their smallest fragment ids per threshold, and the
number of edges the node merged and passed up (what its memory follows).

Segment ids then go down (:func:`down_task`, one per node of level >= 1 from the root, writing
``down/CHILD.npz``; the leaves are resolved by the relabel tasks, :func:`leaf_ids`), so that no
process holds a table of every fragment (``lookup.py``).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tokenunify.agglomerate.graph import stitch_pairs
from tokenunify.agglomerate.lookup import NodeJoins, exported_mins
from tokenunify.agglomerate.merge import NodeGraph, merge_node
from tokenunify.agglomerate.scoring import Scoring, discretize
from tokenunify.heap import arrow_system_pool, release_free_memory

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


def children(node, fanout, grid_below) -> list[tuple[int, ...]]:
    """The child nodes of ``node`` in the level below (node grid ``grid_below``), raster order."""
    kids = [tuple(n * int(f) + i for n, f, i in zip(node, fanout, off, strict=True))
            for off in itertools.product(*(range(int(f)) for f in fanout))]
    return [k for k in kids if all(a < g for a, g in zip(k, grid_below, strict=True))]


def node_name(level: int, node) -> str:
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


def merge_frames(df: pd.DataFrame, hist: pd.DataFrame | None, frozen, scoring: Scoring,
                 max_threshold: float, engine: str = "auto"
                 ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], pd.DataFrame,
                            pd.DataFrame | None]:
    """:func:`~tokenunify.agglomerate.merge.merge_node` on a level table: (merges as arrays
    (u, v, level) (int64, int64, float64), residual table, residual histograms). Runs the
    compiled kernel (``merge_cpu.cpp``, the same one as the global merge) unless it is
    unavailable or ``engine`` is 'python'. ``frozen`` (the frozen segment ids, a set or an
    int64 array) is read, not updated. ``hist`` rows grouped by edge in the order of ``df``
    (as the node's tables are written) are used as they are; otherwise they are joined on the
    key."""
    from tokenunify.agglomerate.merge import compiled_extension

    ext = None if engine == "python" else compiled_extension()
    if ext is None or len(df) == 0:
        hot = set(frozen) if isinstance(frozen, set) else set(np.asarray(frozen).tolist())
        merges, residual = merge_node(_from_frames(df, hist, scoring), hot, scoring,
                                      max_threshold)
        rdf, rh = _to_frames(residual, scoring)
        mu, mv, ml = zip(*merges, strict=True) if merges else ((), (), ())
        return (np.asarray(mu, np.int64), np.asarray(mv, np.int64),
                np.asarray(ml, np.float64)), rdf, rh
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
    hot = (np.fromiter(frozen, np.int64, len(frozen)) if isinstance(frozen, set)
           else np.asarray(frozen, np.int64))
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
        off, hbin, hcnt = _edge_histograms(key, hist)
    out = ext.merge(t(u), t(v), 0 if scoring.kind == "mean" else 1, t(sums), t(counts), t(off),
                    t(hbin), t(hcnt), scoring.quantile, scoring.bins, n, float(max_threshold),
                    t(key), t(df["score"].to_numpy(np.float64)),
                    t(df["stale"].to_numpy().astype(np.uint8)), t(mask))
    out = [x.numpy() for x in out]
    back = np.concatenate([[0], seg])  # local id -> segment id
    merges = back[out[0]], back[out[1]], out[2]
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


def _edge_histograms(key: np.ndarray, hist: pd.DataFrame
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's histogram CSR (offsets (E + 1,), bins int32, counts int64) of the edges
    with keys ``key`` (k0 << 32 | k1) from a (k0, k1, bin, n) table. The nodes write and
    concatenate their tables with each edge's rows together, sorted by bin, in edge order:
    those are taken as they are, without a join (which would hold the table three times)."""
    hk = (hist["k0"].to_numpy(np.int64) << 32) | hist["k1"].to_numpy(np.int64)
    bins = hist["bin"].to_numpy()
    first = np.ones(len(hk), bool)
    first[1:] = hk[1:] != hk[:-1]
    starts = np.flatnonzero(first)
    if np.array_equal(hk[starts], key) and (
            len(bins) < 2 or ((bins[1:] > bins[:-1]) | first[1:]).all()):
        off = np.append(starts, len(hk)).astype(np.int64)
        return off, bins.astype(np.int32), hist["n"].to_numpy(np.int64)
    rows = pd.DataFrame({"key": key, "edge": np.arange(len(key))})
    h = pd.DataFrame({"key": hk, "bin": bins, "n": hist["n"].to_numpy()}).merge(
        rows, on="key", how="inner").sort_values(["edge", "bin"])
    off = np.zeros(len(key) + 1, np.int64)
    off[1:] = np.cumsum(np.bincount(h["edge"].to_numpy(), minlength=len(key)))
    return off, h["bin"].to_numpy(np.int32), h["n"].to_numpy(np.int64)


def _groups(raw: pd.DataFrame, groups: pd.DataFrame, inside_u, inside_v,
            stitch_threshold: float | None):
    """The stitched groups a node can see: connected components of its children's groups
    (fragment, rep) and of the stitch pairs among ``raw`` with both ends inside the node.

    Returns (ids, rep, complete): sorted fragment ids, each one's representative (the smallest
    id of its group so far) and whether its group is complete here (none of its members has a
    stitch pair leaving the node). Fragments not listed are their own complete group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    stitched = stitch_pairs(raw, stitch_threshold)
    both = stitched & inside_u & inside_v
    su, sv = raw["u"].to_numpy(np.int64), raw["v"].to_numpy(np.int64)
    gf, gr = groups["fragment"].to_numpy(np.int64), groups["rep"].to_numpy(np.int64)
    ids = np.unique(np.concatenate([su[stitched], sv[stitched], gf, gr]))
    if not len(ids):
        return ids, ids, np.zeros(0, bool)
    a = np.searchsorted(ids, np.concatenate([su[both], gf]))
    b = np.searchsorted(ids, np.concatenate([sv[both], gr]))
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(ids), len(ids)))
    _, comp = connected_components(graph, directed=False)
    smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, comp, ids)
    open_ = np.zeros(comp.max() + 1, bool)  # a member's stitch pair leaves the node
    out_u, out_v = stitched & inside_u & ~inside_v, stitched & inside_v & ~inside_u
    open_[comp[np.searchsorted(ids, su[out_u])]] = True
    open_[comp[np.searchsorted(ids, sv[out_v])]] = True
    return ids, smallest[comp], ~open_[comp]


def _lookup(ids, values, default, query):
    """values[i] where ids[i] == query, else default(query) (ids sorted)."""
    query = np.asarray(query, np.int64)
    out = default(query)
    if len(ids):
        i = np.minimum(np.searchsorted(ids, query), len(ids) - 1)
        hit = ids[i] == query
        out[hit] = values[i[hit]]
    return out


def _read(base: Path, suffix: str) -> pd.DataFrame:
    path = Path(f"{base}{suffix}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: an output of node {base.name} is missing (rerun that "
                                f"level)")
    return pd.read_parquet(path)


def node_task(work: str, level: int, node, grids, fanout, frag_blocks: FragmentBlocks,
              scoring: Scoring, thresholds, stitch_threshold: float | None = None) -> None:
    """Merge one node of one level up to the largest of ``thresholds`` (see the module
    docstring); the caller marks it done."""
    arrow_system_pool()  # freed read buffers go back at once, not at the task's end
    thresholds = tuple(float(t) for t in thresholds)
    work = Path(work)
    out = work / "levels"
    node = tuple(int(i) for i in node)
    scale = np.array([int(f) ** level for f in fanout])
    hist_cols = ["u", "v", "bin", "n"]

    def home(ids):
        if not len(ids):
            return np.zeros((0, 3), np.int64)
        try:
            return frag_blocks(ids) // scale
        except ValueError as exc:
            raise ValueError(f"level {level} node {list(node)}"
                             f"{' (block ' + str(list(node)) + ')' if level == 0 else ''}: "
                             f"{exc}") from exc

    def inside(ids):
        return (home(ids) == node).all(axis=1)

    state, state_h = None, None
    if level == 0:
        raw, raw_hist = _block_graph(work / "edges", node, grids[0], scoring, frag_blocks.n)
        raw = raw[(raw["own"].to_numpy() | inside(raw["u"].to_numpy()) |
                   inside(raw["v"].to_numpy()))]
        agg = {"count": "sum", "sum": "sum", "max": "max"}
        agg.update({c: "sum" for c in ("cut_count", "cut_sum") if c in raw})
        raw = raw.groupby(["u", "v"], as_index=False)[list(agg)].agg(agg)
        if raw_hist is not None:  # only the kept edges' histograms
            raw_hist = raw_hist.merge(raw[["u", "v"]], on=["u", "v"])
            raw_hist = raw_hist.groupby(["u", "v", "bin"], as_index=False)["n"].sum()
        groups = pd.DataFrame({"fragment": np.zeros(0, np.int64), "rep": np.zeros(0, np.int64)})
    else:
        kids = children(node, fanout, grids[level - 1])
        parts: dict[str, list] = {"": [], ".hist": [], ".raw": [], ".rawhist": [], ".groups": []}
        for k in kids:
            base = out / node_name(level - 1, k)
            for suffix, frames in parts.items():
                if suffix == ".hist" and scoring.kind == "mean" or \
                        suffix == ".rawhist" and not scoring.needs_histogram:
                    continue
                frames.append(_read(base, suffix + ".parquet"))
        # an edge between two children is in both outputs, unchanged (raw, its ends frozen)
        state = pd.concat(parts[""], ignore_index=True)
        state_h = pd.concat(parts[".hist"], ignore_index=True) if parts[".hist"] else None
        raw = pd.concat(parts[".raw"], ignore_index=True).drop_duplicates(["u", "v"])
        raw_hist = (pd.concat(parts[".rawhist"], ignore_index=True).drop_duplicates(
            ["u", "v", "bin"]) if parts[".rawhist"] else None)
        groups = pd.concat(parts[".groups"], ignore_index=True)
        del parts  # the concatenations are copies
        child_ids, child_mins = merged_exports([exports(out / node_name(level - 1, k))
                                                for k in kids])
    if level == 0:
        child_ids, child_mins = np.zeros(0, np.int64), np.zeros((len(thresholds), 0), np.int64)
    # stitching: a raw edge becomes a graph edge here when both ends are inside and their
    # groups complete; the others go up raw, and their ends (groups) are frozen
    ru, rv = raw["u"].to_numpy(np.int64), raw["v"].to_numpy(np.int64)
    in_u, in_v = inside(ru), inside(rv)
    ids, rep, complete = _groups(raw, groups, in_u, in_v, stitch_threshold)

    def rep_of(q):  # a fragment outside every group is its own representative
        return _lookup(ids, rep, lambda x: x.copy(), q)

    def complete_of(q):  # ... and a complete group
        return _lookup(ids, complete, lambda x: np.ones(len(x), bool), q)

    rep_u, rep_v = rep_of(ru), rep_of(rv)
    ready = in_u & in_v & complete_of(ru) & complete_of(rv)
    carry = raw[~ready]
    new = raw[ready].assign(u=np.minimum(rep_u, rep_v)[ready], v=np.maximum(rep_u, rep_v)[ready])
    new = new[new["u"] != new["v"]]
    new = new.groupby(["u", "v"], as_index=False)[["count", "sum", "max"]].agg(
        {"count": "sum", "sum": "sum", "max": "max"})
    new_hist = None
    if raw_hist is not None:
        m = raw_hist.merge(raw[ready][["u", "v"]], on=["u", "v"])
        mu, mv = rep_of(m["u"].to_numpy()), rep_of(m["v"].to_numpy())
        new_hist = m.assign(u=np.minimum(mu, mv), v=np.maximum(mu, mv))
        new_hist = new_hist[new_hist["u"] != new_hist["v"]].groupby(
            ["u", "v", "bin"], as_index=False)["n"].sum()
        del m
    df, h = _leaf_frames(new, new_hist, scoring)
    del new, new_hist, raw
    if state is not None and len(state):
        df = pd.concat([state, df[state.columns]], ignore_index=True)
        h = pd.concat([x for x in (state_h, h) if x is not None], ignore_index=True) \
            if h is not None or state_h is not None else None
    del state, state_h
    frozen = np.union1d(rep_u[~ready], rep_v[~ready])
    release_free_memory()  # what reading and stitching freed, before the kernel allocates
    merges, rdf, rh = merge_frames(df, h, frozen, scoring, max(thresholds))
    n_edges = len(df)
    del df, h
    # groups the parent needs: every member of an open group, and the members that carried
    # edges name; groups completed here go into the history's stitched representatives
    big = np.zeros(len(ids), bool)
    if len(ids):
        reps, sizes = np.unique(rep, return_counts=True)
        big = sizes[np.searchsorted(reps, rep)] > 1
    named = np.union1d(carry["u"].to_numpy(np.int64), carry["v"].to_numpy(np.int64))
    keep_g = big & (~complete | np.isin(ids, named))
    done_g = big & complete
    base = out / node_name(level, node)
    out.mkdir(parents=True, exist_ok=True)
    if scoring.kind != "mean":
        (rh if rh is not None else pd.DataFrame(columns=["k0", "k1", "bin", "n"])).to_parquet(
            str(base) + ".hist.parquet")
    if raw_hist is not None:
        raw_hist.merge(carry[["u", "v"]], on=["u", "v"])[hist_cols].to_parquet(
            str(base) + ".rawhist.parquet")
    carry.to_parquet(str(base) + ".raw.parquet")
    pd.DataFrame({"fragment": ids[keep_g], "rep": rep[keep_g]}).to_parquet(
        str(base) + ".groups.parquet")
    # the ids that go up (segments and open groups' fragments), with their smallest fragment
    # ids per threshold, for the segment ids going down (lookup.py)
    inside_ends = np.concatenate([rep_u[~ready & in_u], rep_v[~ready & in_v]])
    exported = np.unique(np.concatenate([rdf["u"].to_numpy(np.int64), rdf["v"].to_numpy(np.int64),
                                         inside_ends, ids[~complete]]))
    joins = NodeJoins(merges[0], merges[1], merges[2], ids[done_g], rep[done_g], exported)
    np.savez(str(base) + ".merges.npz", u=joins.u.astype(np.uint64), v=joins.v.astype(np.uint64),
             level=joins.level, pre_fragment=joins.pre_fragment.astype(np.uint64),
             pre_rep=joins.pre_rep.astype(np.uint64), exported=exported,
             mins=exported_mins(joins, thresholds, child_ids, child_mins),
             edges=n_edges, residual=len(rdf))  # the node's size, for its memory
    rdf.to_parquet(str(base) + ".parquet")  # written last: its presence means done
    log.debug("level %d node %s: %d edges, %d carried up raw, %d merges, %d residual", level,
              node, n_edges, len(carry), len(merges[0]), len(rdf))


def exports(base: Path) -> tuple[np.ndarray, np.ndarray]:
    """A node's exported ids and their smallest fragment ids (T, n)."""
    with np.load(Path(f"{base}.merges.npz")) as f:
        return f["exported"].astype(np.int64), f["mins"].astype(np.int64)


def merged_exports(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several nodes' :func:`exports` as one: ids sorted, mins (T, n) in the same order."""
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids, kind="stable")
    return ids[order], np.concatenate([p[1] for p in parts], axis=1)[:, order]
