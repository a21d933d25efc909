"""Segment ids of the hierarchical merge, node by node: no process holds a table of every
fragment (the flat merge's ``luts.zarr``) or the whole merge history.

At threshold t a fragment's segment id is the smallest fragment id of its component under the
merges below t (stitched groups joined first), as :meth:`~tokenunify.agglomerate.merge.
MergeHistory.lut` computes it globally. In the hierarchy each node's merges and completed
groups join its *input ids* (its children's exported ids, or a leaf's fragments) into
components. A component holds at most one of the node's *exported ids*: the segments that go up
(frozen survivors, which never merge in the node with each other) and the fragments of stitched
groups still open. So:

- going up (:func:`exported_mins`, in each node's task): the smallest fragment id of each
  exported segment's component at every threshold, from its members' own smallest ids;
- going down (:func:`resolve`, one task per node from the root, and the relabel task at the
  leaves): an id whose component holds an exported id takes what the parent resolved for that
  id; any other component is closed at this node and takes its smallest fragment id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class NodeJoins:
    """What joins ids inside one node: merges (u absorbed v at level) and completed stitched
    groups (fragment, rep), all uint64/int64 ids, plus the node's exported ids (sorted)."""

    u: np.ndarray
    v: np.ndarray
    level: np.ndarray
    pre_fragment: np.ndarray
    pre_rep: np.ndarray
    exported: np.ndarray

    def components(self, thresholds, extra_ids: np.ndarray):
        """Per threshold, the component of every id in ``ids`` (sorted: every id the joins
        name, the exported ids and ``extra_ids``): returns (ids, [comp (len(ids),) per
        threshold])."""
        ids = np.unique(np.concatenate([np.asarray(x, np.int64) for x in (
            self.u, self.v, self.pre_fragment, self.pre_rep, self.exported, extra_ids)]))
        gu = np.searchsorted(ids, np.asarray(self.pre_fragment, np.int64))
        gv = np.searchsorted(ids, np.asarray(self.pre_rep, np.int64))
        mu = np.searchsorted(ids, np.asarray(self.u, np.int64))
        mv = np.searchsorted(ids, np.asarray(self.v, np.int64))
        comps = []
        for t in thresholds:
            below = np.asarray(self.level) < t
            a, b = np.concatenate([gu, mu[below]]), np.concatenate([gv, mv[below]])
            graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(ids), len(ids)))
            comps.append(connected_components(graph, directed=False)[1])
        return ids, comps


def _index(ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Positions of ``query`` in sorted ``ids`` (every query present)."""
    return np.searchsorted(ids, np.asarray(query, np.int64))


def _smallest(comp, own_min, n_comp) -> np.ndarray:
    """The smallest ``own_min`` of each of ``n_comp`` components."""
    out = np.full(n_comp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(out, comp, own_min)
    return out


def own_mins(ids: np.ndarray, child_ids: np.ndarray, child_mins: np.ndarray) -> np.ndarray:
    """(T, len(ids)) each id's smallest fragment id below this node: the child's figure for the
    children's exported ids, the id itself for the rest (a fragment, or the smallest member of a
    stitched group, its representative)."""
    T = child_mins.shape[0]
    out = np.broadcast_to(ids, (T, len(ids))).copy()
    if len(child_ids):
        pos = np.minimum(np.searchsorted(child_ids, ids), len(child_ids) - 1)
        hit = child_ids[pos] == ids
        out[:, hit] = child_mins[:, pos[hit]]
    return out


def exported_mins(joins: NodeJoins, thresholds, child_ids: np.ndarray,
                  child_mins: np.ndarray) -> np.ndarray:
    """(T, len(exported)) int64: the smallest fragment id of each exported id's component in
    this node's subtree, per threshold (``child_ids`` sorted, ``child_mins`` (T, n))."""
    ids, comps = joins.components(thresholds, child_ids)
    mins = own_mins(ids, child_ids, child_mins.reshape(len(thresholds), -1))
    out = np.zeros((len(thresholds), len(joins.exported)), np.int64)
    at = _index(ids, joins.exported)
    for k, comp in enumerate(comps):
        out[k] = _smallest(comp, mins[k], comp.max() + 1 if len(comp) else 0)[comp[at]]
    return out


def resolve(joins: NodeJoins, thresholds, query: np.ndarray, child_ids: np.ndarray,
            child_mins: np.ndarray, parent_ids: np.ndarray, parent_final: np.ndarray
            ) -> np.ndarray:
    """(T, len(query)) uint64: the segment id of every query id at every threshold.

    Args:
        query: ids to resolve (a child's exported ids, or a leaf's fragments).
        child_ids, child_mins: the children's exported ids (sorted) and their smallest
            fragment ids (T, n); empty at a leaf.
        parent_ids, parent_final: this node's exported ids and what the parent resolved for
            them (T, n); empty at the root.
    """
    query = np.asarray(query, np.int64)
    ids, comps = joins.components(thresholds, np.union1d(query, child_ids))
    mins = own_mins(ids, child_ids, np.asarray(child_mins, np.int64).reshape(len(thresholds), -1))
    at = _index(ids, query)
    out = np.zeros((len(thresholds), len(query)), np.uint64)
    exp_at = _index(ids, joins.exported)
    missing = np.setdiff1d(joins.exported, parent_ids)
    if len(missing):
        raise ValueError(f"the parent resolved no segment id for exported id {int(missing[0])}")
    for k, comp in enumerate(comps):
        n = comp.max() + 1 if len(comp) else 0
        final = _smallest(comp, mins[k], n).astype(np.uint64)
        if len(joins.exported):  # components holding an exported id take the parent's answer
            final[comp[exp_at]] = np.asarray(parent_final, np.uint64)[
                k, _index(np.asarray(parent_ids, np.int64), joins.exported)]
        out[k] = final[comp[at]]
    return out
