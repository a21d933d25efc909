"""Global agglomeration of the fragment graph with waterz's iterative region merging.

The algorithm follows waterz's ``IterativeRegionMerging`` (``mergeUntil``):

- every edge is scored and queued; the edge with the lowest score is popped;
- a deleted edge is skipped; a *stale* edge (its statistics changed by a merge since it was
  scored) is re-scored and queued again, not merged;
- otherwise its two regions merge. Each edge of the absorbed region either moves to the
  surviving region or, when the surviving region already has an edge to the same neighbour,
  the two edges merge: statistics add into the one with the lower current (score, key),
  which is marked stale and takes the smaller key of the two (queued again at once under the
  new key when that is smaller, its old entry skipped); the other is deleted;
- merging stops when the queue's lowest score reaches the threshold.

One pass up to the largest threshold serves all thresholds: each merge is recorded with its
*level*, the largest score popped so far. waterz, run threshold by threshold on the same queue,
stops for threshold t at the first popped score >= t, so its segmentation at t is exactly the
merges whose level is < t. Ties in score are broken by the edge's *key*: its index in (u, v)
order, and for a merged edge the smallest index among its parts. The key, the stored score
(the lowest of the parts') and the statistics of a merged edge therefore depend only on which
fragment pairs it holds, never on which region survived or on the order edges were merged in,
and the queue always orders an edge by its current key: the result is a pure function of the
graph, which the hierarchical merge (``hierarchy.py``) reproduces node by node. waterz breaks
ties in heap order and keeps the absorbed region's edge, so on the same graph the two can
differ where equal scores compete (measured in the tests).

Two implementations with the identical merge history: the compiled one (``merge_cpu.cpp``, built
once with torch's extension builder like the fused scan; flat arrays) is used whenever it
builds, and the pure-Python one (:func:`agglomerate_graph_python`) is the reference of the
tests and the fallback without a compiler. On a 1.5 M-edge grid graph the compiled one is about
15-23x faster and takes about 130 bytes per edge to the Python one's 840
(``benchmarks/bench_merge.py``; the kernel's header says where the time goes).
``TOKENUNIFY_COMPILED_MERGE=0`` forces the Python one.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from tokenunify.agglomerate.scoring import Scoring, discretize

log = logging.getLogger(__name__)


@dataclass
class MergeHistory:
    """Merges in order: fragment ids u, v (uint64) and level (float64) each of length M; ``pre``
    maps fragments onto the stitched representatives the merges are expressed in."""

    u: np.ndarray
    v: np.ndarray
    level: np.ndarray
    n_fragments: int
    pre: np.ndarray | None = None  # fragment -> stitched representative, applied first

    def lut(self, threshold: float) -> np.ndarray:
        """Fragment id -> segment id at ``threshold``, (n_fragments + 1,) uint64.

        A segment's id is the smallest fragment id in it, so it does not depend on the order
        of merges or on how the volume was cut into blocks. Id 0 stays 0.
        """
        n = self.n_fragments + 1
        sel = self.level < threshold
        graph = coo_matrix((np.ones(int(sel.sum()), np.int8),
                            (self.u[sel].astype(np.int64), self.v[sel].astype(np.int64))),
                           shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(smallest, comp, np.arange(n, dtype=np.int64))
        out = smallest[comp].astype(np.uint64)
        out[0] = 0
        return out if self.pre is None else out[self.pre.astype(np.int64)]


TIES = "canonical-keys"  # the tie rules above; part of the agglomerate stage's lineage
# a hierarchy node's rule for what waits for the parent (hierarchy.py); part of the lineage
# with agglomerate.hierarchy: nodes merged under the former rule (ends' own ties only) are
# never resumed
NODE_RULE = "tie-paths"


def compiled_extension():
    """The compiled merge (``merge_cpu.cpp``), built on first use; None when unavailable or
    disabled (``TOKENUNIFY_COMPILED_MERGE=0``)."""
    from tokenunify.native import optional_extension

    # no fast-math: scores must round exactly as the Python reference's
    return optional_extension("tokenunify_merge_cpu", Path(__file__).with_name("merge_cpu.cpp"),
                              ["-O2"], None, disable_env="TOKENUNIFY_COMPILED_MERGE",
                              fallback="the Python merge")


def agglomerate_graph(edges: pd.DataFrame, n_fragments: int, scoring: Scoring,
                      max_threshold: float, histograms: pd.DataFrame | None = None,
                      engine: str = "auto") -> MergeHistory:
    """Run the merging on a fragment graph up to ``max_threshold`` (arguments as
    :func:`agglomerate_graph_python`). ``engine``: 'compiled', 'python', or 'auto' (compiled
    when it builds)."""
    if engine not in ("auto", "compiled", "python"):
        raise ValueError(f"merge engine must be auto, compiled or python, not {engine!r}")
    ext = None if engine == "python" else compiled_extension()
    if ext is None:
        if engine == "compiled":
            raise RuntimeError("the compiled merge is unavailable (see the warning above)")
        return agglomerate_graph_python(edges, n_fragments, scoring, max_threshold, histograms)
    import torch

    if len(edges) == 0:
        return MergeHistory(np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                            np.zeros(0, np.float64), n_fragments)
    u = edges["u"].to_numpy(np.int64)
    v = edges["v"].to_numpy(np.int64)
    order = np.lexsort((v, u))  # edge index = rank in (u, v) order, as the reference's
    u, v = u[order], v[order]
    E = len(u)
    if E >= 2**31 or n_fragments >= 2**32:
        raise ValueError(f"the compiled merge takes < 2^31 edges and < 2^32 fragments per "
                         f"process, not {E} and {n_fragments}")
    if len(u) and (u.min() < 1 or v.max() > n_fragments or (u >= v).any()):
        raise ValueError(f"edge table: ids must satisfy 1 <= u < v <= n_fragments "
                         f"({n_fragments}); got u in [{u.min()}, {u.max()}], v in "
                         f"[{v.min()}, {v.max()}]")
    empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
    sums, counts, off, hbin, hcnt = empty_f, empty_i, np.zeros(E + 1, np.int64), \
        np.zeros(0, np.int32), empty_i
    if scoring.kind == "mean":
        sums = edges["sum"].to_numpy(np.float64)[order]
        counts = edges["count"].to_numpy(np.int64)[order]
    elif scoring.init_with_max:
        off = np.arange(E + 1, dtype=np.int64)
        hbin = discretize(edges["max"].to_numpy()[order], scoring.bins).astype(np.int32)
        hcnt = np.ones(E, np.int64)
    else:
        if histograms is None:
            raise ValueError(f"scoring {scoring.name!r} needs per-sample histograms")
        idx = pd.DataFrame({"u": u, "v": v, "edge": np.arange(E)})
        h = histograms.merge(idx, on=["u", "v"], how="inner", validate="many_to_one")
        h = h.groupby(["edge", "bin"], sort=True, as_index=False)["n"].sum()
        off[1:] = np.cumsum(np.bincount(h["edge"].to_numpy(), minlength=E))
        hbin = h["bin"].to_numpy(np.int32)
        hcnt = h["n"].to_numpy(np.int64)
    def t(a):  # zero-copy unless pandas handed out a read-only view
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))

    none_i, none_f, none_b = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64),
                              torch.zeros(0, dtype=torch.uint8))
    mu, mv, ml = ext.merge(t(u), t(v), 0 if scoring.kind == "mean" else 1, t(sums), t(counts),
                           t(off), t(hbin), t(hcnt), scoring.quantile, scoring.bins,
                           int(n_fragments), float(max_threshold), none_i, none_f, none_b,
                           none_b)[:3]
    log.info("agglomerated %d fragments, %d edges (compiled): %d merges below %.3f",
             n_fragments, E, len(mu), max_threshold)
    return MergeHistory(mu.numpy().astype(np.uint64), mv.numpy().astype(np.uint64),
                        ml.numpy(), n_fragments)


def agglomerate_graph_python(edges: pd.DataFrame, n_fragments: int, scoring: Scoring,
                             max_threshold: float, histograms: pd.DataFrame | None = None
                             ) -> MergeHistory:
    """Run the merging on a fragment graph up to ``max_threshold``: the pure-Python reference,
    :func:`merge_node` on the whole graph with nothing frozen (keys are the (u, v) pairs, whose
    order is the edge index's).

    Args:
        edges: reduced edge table (u < v, both in 1..n_fragments; count, sum, max).
        n_fragments: largest fragment id.
        scoring: the parsed scoring function.
        max_threshold: stop when the lowest queued score reaches it.
        histograms: (u, v, bin, n) table, needed when ``scoring.needs_histogram``.
    """
    edges = edges.sort_values(["u", "v"], kind="stable").reset_index(drop=True)
    merges, _ = merge_node(NodeGraph.from_edges(edges, scoring, histograms), set(), scoring,
                           max_threshold, progress=n_fragments)
    log.info("agglomerated %d fragments, %d edges: %d merges below %.3f", n_fragments,
             len(edges), len(merges), max_threshold)
    u, v, lev = zip(*merges, strict=True) if merges else ((), (), ())
    return MergeHistory(np.asarray(u, np.uint64), np.asarray(v, np.uint64),
                        np.asarray(lev, np.float64), n_fragments)


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


def merge_node(graph: NodeGraph, frozen: set, scoring: Scoring, max_threshold: float,
               progress: int = 0) -> tuple[list, NodeGraph]:
    """Merge inside one node.

    Args:
        graph: the edges between segments of the node (its children's residuals and the edges
            between its children).
        frozen: the node's segments that have an edge leaving the node (updated in place with
            the segments frozen here).
        scoring, max_threshold: as the global merge.
        progress: show a progress bar of merges out of this many (0: none).

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
    bar = tqdm(total=progress, desc="agglomerate", unit="merge", disable=None if progress else True,
               leave=False)
    ties = _Ties(adj, score, frozen)
    while heap and heap[0][0] < max_threshold:
        s, k, e = heapq.heappop(heap)
        if s > level:
            ties.new_level(s)
        level = max(level, s)
        if deleted[e] or k != key[e]:
            continue
        a, b = eu[e], ev[e]
        # in a node: whether the parent may already have merged this edge's ends (tied with
        # frozen segments at this level); then it waits for the parent, and so do its regions,
        # unless one end is frozen and the other can only join it through this edge
        hot = bool(frozen) and ties.tainted(a)
        if stale[e]:
            score[e] = scoring.score(state[e])
            stale[e] = False
            ties.rescored(e)
            if hot and score[e] > level and not ties.only_link(a, b):  # it leaves the level:
                frozen.update((a, b))  # its ends may have merged in the parent, they wait
            heapq.heappush(heap, (score[e], key[e], e))
            continue
        if hot:
            if not ties.only_link(a, b):
                frozen.update((a, b))
                continue
            if b in frozen:  # the frozen end absorbs: its id is the one the parent knows
                a, b = b, a
        elif len(adj[a]) < len(adj[b]):
            a, b = b, a
        merges.append((a, b, level))
        bar.update()
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
    bar.close()
    residual = NodeGraph()
    for e in range(E):
        if not deleted[e] and (eu[e] in frozen or ev[e] in frozen):
            residual.add(eu[e], ev[e], key[e], state[e], score[e], stale[e])
    return merges, residual


class _Ties:
    """Which segments of a node the parent may already have merged with frozen ones, at the
    current level ``s`` of the queue (see hierarchy.py).

    Globally, a frozen segment absorbs at level ``s`` what the parent lets it, in key order;
    the parent's merges lower keys (a merged edge takes the smaller key of its parts), so the
    node cannot tell which of the edges tied at ``s`` it pops first. A segment is *tainted* at
    ``s`` when a path of live edges stored at ``s`` or below (or re-scored at ``s``: they were
    tied when the level began) links it to a frozen segment; the parent may have merged it
    before any pop of this level. The taint is a property of the level's tie components, which
    the level's merges, freezes and absorptions do not change (they only act on tainted
    segments, or join two untainted ones linked by a tie), so it is computed once per
    component and level."""

    def __init__(self, adj: dict, score: list, frozen: set):
        self.adj, self.score, self.frozen = adj, score, frozen
        self.level = -np.inf
        self.now: set = set()   # edges re-scored at this level
        self.memo: dict = {}    # segment -> tainted at this level

    def new_level(self, level: float) -> None:
        self.level = level
        self.now.clear()
        self.memo.clear()

    def rescored(self, e: int) -> None:
        self.now.add(e)

    def tainted(self, r) -> bool:
        if r in self.frozen:
            return True
        if r in self.memo:
            return self.memo[r]
        seen, todo, hit = {r}, [r], False
        while todo and not hit:
            for m, y in self.adj[todo.pop()].items():
                if m in seen or (self.score[y] > self.level and y not in self.now):
                    continue
                if m in self.frozen:
                    hit = True
                    break
                seen.add(m)
                todo.append(m)
        for q in seen:
            self.memo[q] = hit
        return hit

    def only_link(self, a, b) -> bool:
        """Whether the popped edge (a, b) is the whole of the link between its unfrozen end and
        the global segment of its frozen end: one end is frozen and none of the other end's
        other neighbours is frozen or tainted (so none is in that segment yet). Then the
        unfrozen end joins it here, on this edge, or (the edge stale and re-scored higher) not
        at this level."""
        if (a in self.frozen) == (b in self.frozen):
            return False
        f, x = (a, b) if a in self.frozen else (b, a)
        return all(n == f or not self.tainted(n) for n in self.adj[x])
