"""Hierarchical agglomeration: the global merge done node by node up a fixed hierarchy of blocks,
so that no process holds the whole fragment graph (ABISS's octree reduction).

Each node of the hierarchy (a leaf is a block; a parent groups its children) merges the edges
among its segments in the same (score, key) order as the global merge, with one rule: a segment
that has an edge leaving the node is *frozen*, and so is every segment whose popped edge leads
to a frozen one. A frozen segment never merges inside the node; its live edges (the *residual*)
go up to the parent together with the edges that leave the node. The root has nothing frozen and
finishes the merge.

Why this gives the global result. The queue's popped scores never decrease (a merged edge scores
at least the lower of its two parts, which is the one kept), so a merge's level is its own
score. A non-frozen segment's edges and statistics depend only on merges inside the node, which
happen in the global order. Ties need three more facts. An edge is queued by its *key*, the
smallest original (u, v) pair among its parts, which the node knows without the whole graph. A
merged edge's key, stored score and statistics depend only on its parts, not on the order they
were merged in (which differs here: a frozen segment's edges merge with one another only in
the parent). And a merge also waits when one of its ends has an edge to a frozen segment scored
no higher than the merge: the parent may, at the same score and a smaller key, first merge that
frozen segment with something the node cannot see, which changes the end's edges. Measured
(tests/agglomerate/test_hierarchy.py, test_levels.py): identical segmentations at every
threshold for the mean and for the quantile on 256 bins (and on 8 bins, where ties are
everywhere), levels equal up to the rounding of sums added in another order.

This module is the in-memory reference of the node step (:func:`merge_node`) and of the whole
reduction (:func:`hierarchical_merge`); the blockwise stage runs the same step per node.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tokenunify.agglomerate.merge import MergeHistory
from tokenunify.agglomerate.scoring import Scoring


@dataclass
class NodeGraph:
    """The edges a node works on, one entry per edge (lists, parallel): current endpoints
    ``u < v`` (segment ids), the tie-break ``key`` (the original (u, v) pair), the scoring
    ``state``, the stored ``score`` and whether it is ``stale``."""

    u: list = field(default_factory=list)
    v: list = field(default_factory=list)
    key: list = field(default_factory=list)
    state: list = field(default_factory=list)
    score: list = field(default_factory=list)
    stale: list = field(default_factory=list)

    def add(self, u, v, key, state, score, stale) -> None:
        self.u.append(u)
        self.v.append(v)
        self.key.append(key)
        self.state.append(state)
        self.score.append(score)
        self.stale.append(stale)

    def __len__(self) -> int:
        return len(self.u)

    @classmethod
    def from_edges(cls, edges: pd.DataFrame, scoring: Scoring,
                   histograms: pd.DataFrame | None = None) -> NodeGraph:
        """The fragment graph (reduced edge table: u < v, count, sum, max) as a NodeGraph."""
        u = edges["u"].to_numpy(np.int64).tolist()
        v = edges["v"].to_numpy(np.int64).tolist()
        hists = None
        if scoring.needs_histogram:
            if histograms is None:
                raise ValueError(f"scoring {scoring.name!r} needs per-sample histograms")
            hists = {(int(a), int(b)): dict(zip(g["bin"].tolist(), g["n"].tolist(), strict=True))
                     for (a, b), g in histograms.groupby(["u", "v"], sort=False)}
            hists = [hists[(a, b)] for a, b in zip(u, v, strict=True)]
        states = scoring.initial_states(edges["count"].to_numpy(), edges["sum"].to_numpy(),
                                        edges["max"].to_numpy(), hists)
        g = cls()
        for a, b, s in zip(u, v, states, strict=True):
            g.add(a, b, (a, b), s, scoring.score(s), False)
        return g


def merge_node(graph: NodeGraph, frozen: set, scoring: Scoring, max_threshold: float
               ) -> tuple[list, NodeGraph]:
    """Merge inside one node.

    Args:
        graph: the edges between segments of the node (its children's residuals and the edges
            between its children).
        frozen: the node's segments that have an edge leaving the node (updated in place with
            the segments frozen here).
        scoring, max_threshold: as the global merge.

    Returns:
        (merges, residual): merges as (a, b, level) with a absorbing b; the residual is every
        live edge of ``graph`` with a frozen endpoint, for the parent.
    """
    E = len(graph)
    eu, ev = list(graph.u), list(graph.v)
    state, score, stale = list(graph.state), list(graph.score), list(graph.stale)
    key = list(graph.key)
    deleted = [False] * E
    adj: dict[int, dict[int, int]] = {}
    for e in range(E):
        adj.setdefault(eu[e], {})[ev[e]] = e
        adj.setdefault(ev[e], {})[eu[e]] = e
    heap = [(score[e], key[e], e) for e in range(E)]
    heapq.heapify(heap)
    merges = []
    level = -np.inf
    while heap and heap[0][0] < max_threshold:
        s, k, e = heapq.heappop(heap)
        level = max(level, s)
        if deleted[e] or k != key[e]:
            continue
        if stale[e]:
            score[e] = scoring.score(state[e])
            stale[e] = False
            heapq.heappush(heap, (score[e], key[e], e))
            continue
        a, b = eu[e], ev[e]
        # its merge waits for the parent, and so do its regions, when an end is frozen, or when
        # an end has an edge to a frozen segment scored no higher (a tie: the parent may merge
        # that first, which changes this edge's neighbourhood)
        if frozen and (a in frozen or b in frozen or any(
                n in frozen and score[x] <= s for r in (a, b) for n, x in adj[r].items())):
            frozen.update((a, b))
            continue
        if len(adj[a]) < len(adj[b]):
            a, b = b, a
        merges.append((a, b, level))
        del adj[a][b]
        del adj[b][a]
        deleted[e] = True
        for n, eb in adj.pop(b).items():
            del adj[n][b]
            ea = adj[a].get(n)
            if ea is None:
                adj[a][n] = eb
                adj[n][a] = eb
                eu[eb], ev[eb] = (a, n) if a < n else (n, a)
                continue
            if (score[eb], key[eb]) > (score[ea], key[ea]):
                keep, drop = ea, eb
            else:
                keep, drop = eb, ea
                eu[keep], ev[keep] = (a, n) if a < n else (n, a)
            scoring.merge(state[keep], state[drop])
            if key[drop] < key[keep]:
                key[keep] = key[drop]
                heapq.heappush(heap, (score[keep], key[keep], keep))
            state[drop] = None
            deleted[drop] = True
            stale[keep] = True
            adj[a][n] = keep
            adj[n][a] = keep
    residual = NodeGraph()
    for e in range(E):
        if not deleted[e] and (eu[e] in frozen or ev[e] in frozen):
            residual.add(eu[e], ev[e], key[e], state[e], score[e], stale[e])
    return merges, residual


def hierarchical_merge(graph: NodeGraph, n_fragments: int, scoring: Scoring,
                       max_threshold: float, leaf_of: np.ndarray, parents: list[np.ndarray]
                       ) -> tuple[MergeHistory, list[int]]:
    """The global merge of ``graph`` done up a hierarchy, in memory (the reference).

    Args:
        leaf_of: (n_fragments + 1,) the leaf node of every fragment.
        parents: one array per level: ``parents[k][i]`` is the parent (at level k + 1) of node i
            of level k; the last level must have a single node (the root).

    Returns:
        (history, largest): the merges, and per level the most edges one node worked on.
    """
    levels = [np.asarray(leaf_of)]
    for p in parents:
        levels.append(np.asarray(p)[levels[-1]])
    if len(np.unique(levels[-1][1:])) > 1:
        raise ValueError("the hierarchy's last level must have one node (the root)")
    history, largest = [], []
    live = graph
    for nodes in levels:
        nu = nodes[np.asarray(live.u, np.int64)]
        nv = nodes[np.asarray(live.v, np.int64)]
        carried = NodeGraph()
        frozen: set = set()
        per_node: dict[int, list[int]] = {}
        for e in range(len(live)):
            if nu[e] != nv[e]:  # leaves its nodes: both ends frozen, the edge goes up as is
                frozen.update((live.u[e], live.v[e]))
                carried.add(live.u[e], live.v[e], live.key[e], live.state[e], live.score[e],
                            live.stale[e])
            else:
                per_node.setdefault(int(nu[e]), []).append(e)
        largest.append(max((len(x) for x in per_node.values()), default=0))
        for node in sorted(per_node):
            g = NodeGraph()
            for e in per_node[node]:
                g.add(live.u[e], live.v[e], live.key[e], live.state[e], live.score[e],
                      live.stale[e])
            merges, residual = merge_node(g, frozen, scoring, max_threshold)
            history.extend(merges)
            for e in range(len(residual)):
                carried.add(residual.u[e], residual.v[e], residual.key[e], residual.state[e],
                            residual.score[e], residual.stale[e])
        live = carried
    u, v, lev = (zip(*history, strict=True) if history else ((), (), ()))
    return MergeHistory(np.asarray(u, np.uint64), np.asarray(v, np.uint64),
                        np.asarray(lev, np.float64), n_fragments), largest
