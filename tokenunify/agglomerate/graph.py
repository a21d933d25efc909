"""Fragment-graph edge statistics, per block, and their reduction.

An affinity sample ``aff[c, z, y, x]`` links voxel p = (z, y, x) with p - e_c (offsets
(-1,0,0), (0,-1,0), (0,0,-1)). It belongs to the block whose *core* holds p, so every sample
is counted exactly once: a block reads its core's affinities and the fragments of its core plus
a one-voxel shell on the low side of each axis (where p - e_c may fall). Samples whose two
voxels lie in different, non-zero fragments are collected per fragment pair (u < v), as waterz
builds its region graph (``region_graph.hpp``): count, sum, max and, if asked, the sparse
histogram of discretised affinities.

Tables are pandas DataFrames with columns u, v (uint64), count (int64), sum (float64),
max (float32), and a separate histogram table u, v, bin, n when collected.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tokenunify.agglomerate.scoring import discretize

EDGE_COLUMNS = ["u", "v", "count", "sum", "max", "cut_count", "cut_sum"]


def block_edges(frag: np.ndarray, aff: np.ndarray, shell: tuple[int, int, int],
                histogram_bins: int | None = None, origin: tuple[int, int, int] = (0, 0, 0),
                tile: int | None = None, tile_z: int | None = None,
                ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Edge statistics of one block.

    Args:
        frag: (z, y, x) uint64 global fragment ids of the core grown by ``shell`` voxels
            (0 or 1 per axis) on the low side.
        aff: (3, cz, cy, cx) float32 affinities of the core.
        shell: (sz, sy, sx), 1 where the low-side shell exists (the core does not start at 0).
        histogram_bins: also return per-pair histograms with this many bins.
        origin: volume position (z, y, x) of the core's first voxel.
        tile: fragment tile edge; in-plane samples that cross a tile edge are also summed
            separately (columns cut_count, cut_sum), for stitching tile-split fragments.
        tile_z: depth of 3-D fragment tiles (None: fragments are per section, and a z sample
            never splits one); z samples that cross a tile face count as cuts too.

    Returns:
        (edges, histograms or None), one row per fragment pair.
    """
    start = list(shell)
    us, vs, vals, cuts = [], [], [], []
    for c in range(3):
        own_sl = [slice(st, None) for st in start]
        aff_sl = [slice(None)] * 3
        if not shell[c]:  # the core starts the volume: its first plane has no partner
            own_sl[c] = slice(1, None)
            aff_sl[c] = slice(1, None)
        par_sl = list(own_sl)
        par_sl[c] = slice(own_sl[c].start - 1, frag.shape[c] - 1)  # p - e_c
        own, partner = frag[tuple(own_sl)], frag[tuple(par_sl)]
        keep = (own != partner) & (own != 0) & (partner != 0)
        a, b = own[keep], partner[keep]
        us.append(np.minimum(a, b))
        vs.append(np.maximum(a, b))
        vals.append(aff[c][tuple(aff_sl)][keep].astype(np.float32))
        cut = np.zeros(own.shape, bool)
        edge = tile if c > 0 else tile_z
        if tile and edge:  # a sample whose voxel starts a tile crosses a tile edge
            pos = origin[c] + np.arange(own.shape[c]) + (0 if shell[c] else 1)
            shape = [1, 1, 1]
            shape[c] = -1
            cut = np.broadcast_to((pos % edge == 0).reshape(shape), own.shape)
        cuts.append(cut[keep])
    u, v, val = np.concatenate(us), np.concatenate(vs), np.concatenate(vals)
    cut = np.concatenate(cuts)
    df = pd.DataFrame({"u": u, "v": v, "a": val, "cut": cut.astype(np.int64),
                       "cut_a": np.where(cut, val, 0).astype(np.float64)})
    g = df.groupby(["u", "v"], sort=True)
    edges = pd.DataFrame({"count": g.size().astype(np.int64),
                          "sum": g["a"].sum().astype(np.float64),
                          "max": g["a"].max().astype(np.float32),
                          "cut_count": g["cut"].sum().astype(np.int64),
                          "cut_sum": g["cut_a"].sum()}).reset_index()
    hist = None
    if histogram_bins:
        df["bin"] = discretize(val, histogram_bins)
        hist = df.groupby(["u", "v", "bin"], sort=True).size().rename("n").reset_index()
    return edges, hist


def reduce_edges(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine per-block edge tables: counts and sums add, maxima take the max."""
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                             zip(EDGE_COLUMNS, ["uint64", "uint64", "int64", "float64", "float32",
                                                "int64", "float64"], strict=True)})
    df = pd.concat(tables, ignore_index=True)
    g = df.groupby(["u", "v"], sort=True)
    return pd.DataFrame({"count": g["count"].sum(), "sum": g["sum"].sum(),
                         "max": g["max"].max(), "cut_count": g["cut_count"].sum(),
                         "cut_sum": g["cut_sum"].sum()}).reset_index()


def stitch_pairs(edges: pd.DataFrame, threshold: float | None) -> np.ndarray:
    """(len(edges),) bool: the fragment pairs that a tile edge split and that are joined, those
    whose samples across tile edges have a mean affinity >= ``threshold`` (none when it is None
    or the table has no cut columns)."""
    if threshold is None or edges.empty or "cut_count" not in edges:
        return np.zeros(len(edges), bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = edges["cut_sum"].to_numpy() / edges["cut_count"].to_numpy()
    return (edges["cut_count"].to_numpy() > 0) & (mean >= threshold)


def stitch(edges: pd.DataFrame, n_fragments: int, threshold: float | None,
           histograms: pd.DataFrame | None = None):
    """Join fragments that a tile edge split: pairs whose samples across tile edges have a mean
    affinity >= ``threshold`` (0.5 matches the seeding's own interior test, b < 0.5).

    Returns (pre, edges, histograms): ``pre`` (n_fragments + 1,) uint64 maps every fragment to
    its stitched representative (the smallest id of its group), and the tables are contracted
    onto representatives (counts and sums add, maxima take the max), exactly as if the group
    had been one fragment. ``threshold`` None: nothing is stitched.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = n_fragments + 1
    pre = np.arange(n, dtype=np.uint64)
    sel = stitch_pairs(edges, threshold)
    if not sel.any():
        return pre, edges, histograms
    graph = coo_matrix((np.ones(int(sel.sum()), np.int8),
                        (edges["u"].to_numpy(np.int64)[sel], edges["v"].to_numpy(np.int64)[sel])),
                       shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, comp, np.arange(n, dtype=np.int64))
    pre = smallest[comp].astype(np.uint64)

    def contract(df):
        u, v = pre[df["u"].to_numpy(np.int64)], pre[df["v"].to_numpy(np.int64)]
        df = df.assign(u=np.minimum(u, v), v=np.maximum(u, v))
        return df[df["u"] != df["v"]]

    edges = reduce_edges([contract(edges)])
    if histograms is not None:
        histograms = reduce_histograms([contract(histograms)])
    return pre, edges, histograms


def reduce_histograms(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine per-block histogram tables (u, v, bin, n)."""
    df = pd.concat(tables, ignore_index=True)
    return df.groupby(["u", "v", "bin"], sort=True)["n"].sum().reset_index()
