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

EDGE_COLUMNS = ["u", "v", "count", "sum", "max"]


def block_edges(frag: np.ndarray, aff: np.ndarray, shell: tuple[int, int, int],
                histogram_bins: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Edge statistics of one block.

    Args:
        frag: (z, y, x) uint64 global fragment ids of the core grown by ``shell`` voxels
            (0 or 1 per axis) on the low side.
        aff: (3, cz, cy, cx) float32 affinities of the core.
        shell: (sz, sy, sx), 1 where the low-side shell exists (the core does not start at 0).
        histogram_bins: also return per-pair histograms with this many bins.

    Returns:
        (edges, histograms or None), one row per fragment pair.
    """
    start = list(shell)
    us, vs, vals = [], [], []
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
    u, v, val = np.concatenate(us), np.concatenate(vs), np.concatenate(vals)
    df = pd.DataFrame({"u": u, "v": v, "a": val})
    g = df.groupby(["u", "v"], sort=True)["a"]
    edges = pd.DataFrame({"count": g.size().astype(np.int64), "sum": g.sum().astype(np.float64),
                          "max": g.max().astype(np.float32)}).reset_index()
    hist = None
    if histogram_bins:
        df["bin"] = discretize(val, histogram_bins)
        hist = df.groupby(["u", "v", "bin"], sort=True).size().rename("n").reset_index()
    return edges, hist


def reduce_edges(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine per-block edge tables: counts and sums add, maxima take the max."""
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                             zip(EDGE_COLUMNS, ["uint64", "uint64", "int64", "float64", "float32"],
                                 strict=True)})
    df = pd.concat(tables, ignore_index=True)
    g = df.groupby(["u", "v"], sort=True)
    return pd.DataFrame({"count": g["count"].sum(), "sum": g["sum"].sum(),
                         "max": g["max"].max()}).reset_index()


def reduce_histograms(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine per-block histogram tables (u, v, bin, n)."""
    df = pd.concat(tables, ignore_index=True)
    return df.groupby(["u", "v", "bin"], sort=True)["n"].sum().reset_index()
