"""Segment ids of the hierarchical merge going down, and its merge graph, from the nodes'
files in ``.work/levels`` (:mod:`tokenunify.agglomerate.levels` writes them going up; the
rules are in :mod:`tokenunify.agglomerate.lookup`).

:func:`down_task` runs once per node of level >= 1, from the root down, and writes what it
resolved for each child's exported ids to ``down/CHILD.npz``; :func:`leaf_ids` resolves a
block's fragments from its leaf in the relabel task; :func:`write_graph` writes the output's
merge graph node by node.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from tokenunify.agglomerate.levels import children, exports, merged_exports, node_name
from tokenunify.agglomerate.lookup import NodeJoins, resolve


def _joins(base: Path) -> NodeJoins:
    with np.load(Path(f"{base}.merges.npz")) as f:
        return NodeJoins(f["u"].astype(np.int64), f["v"].astype(np.int64), f["level"],
                         f["pre_fragment"].astype(np.int64), f["pre_rep"].astype(np.int64),
                         f["exported"].astype(np.int64))


def _parent_answer(work: Path, level: int, node, n_levels: int, thresholds):
    """What the parent resolved for this node's exported ids: (ids, final (T, n)); empty at
    the root."""
    if level == n_levels - 1:
        return np.zeros(0, np.int64), np.zeros((len(thresholds), 0), np.uint64)
    path = work / "down" / f"{node_name(level, node)}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the segment ids of level {level} node {list(node)} "
                                f"are missing (rerun the level above)")
    with np.load(path) as f:
        return f["ids"].astype(np.int64), f["final"]


def down_task(work: str, level: int, node, grids, fanout, thresholds) -> None:
    """Resolve the segment ids of the exported ids of every child of one node (level >= 1),
    from the node's joins and its parent's answer, into ``down/CHILD.npz``."""
    work = Path(work)
    node = tuple(int(i) for i in node)
    thresholds = tuple(float(t) for t in thresholds)
    joins = _joins(work / "levels" / node_name(level, node))
    parent_ids, parent_final = _parent_answer(work, level, node, len(grids), thresholds)
    kids = {k: exports(work / "levels" / node_name(level - 1, k))
            for k in children(node, fanout, grids[level - 1])}
    child_ids, child_mins = merged_exports(list(kids.values()))
    (work / "down").mkdir(exist_ok=True)
    for k, (ids, _) in kids.items():
        final = resolve(joins, thresholds, ids, child_ids, child_mins, parent_ids, parent_final)
        path = work / "down" / f"{node_name(level - 1, k)}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, final=final)
        tmp.replace(path)


def leaf_ids(work: str, block, fragments: np.ndarray, n_levels: int, thresholds) -> np.ndarray:
    """(T, len(fragments)) uint64: the segment ids of a block's fragments (sorted, unique), from
    its leaf's joins and the answer its parent resolved."""
    work = Path(work)
    node = tuple(int(i) for i in block)
    parent_ids, parent_final = _parent_answer(work, 0, node, n_levels, thresholds)
    none = np.zeros(0, np.int64)
    return resolve(_joins(work / "levels" / node_name(0, node)), thresholds, fragments, none,
                   np.zeros((len(thresholds), 0), np.int64), parent_ids, parent_final)


GRAPH_CHUNK = 1 << 20  # rows per chunk of the output's merge graph


def write_graph(group, work: Path, grids, n_fragments: int) -> int:
    """Every node's merges into ``group`` (arrays u, v, level and pre, as the flat merge's
    history; merges in node order, which the lookup tables do not depend on), reading each
    node's file once and writing about :data:`GRAPH_CHUNK` merges at a time, so that the whole
    history is never in memory. Returns the number of merges."""
    from tokenunify.io.zarrio import create_array

    n = n_fragments + 1
    arrays = {}
    for key, length, dtype in (("u", 0, np.uint64), ("v", 0, np.uint64),
                               ("level", 0, np.float64), ("pre", n, np.uint64)):
        if key in group:
            del group[key]
        arrays[key] = create_array(group, key, shape=(length,), dtype=dtype,
                                   chunks=(GRAPH_CHUNK,))
    for a in range(0, n, GRAPH_CHUNK):
        arrays["pre"][a:min(n, a + GRAPH_CHUNK)] = np.arange(a, min(n, a + GRAPH_CHUNK),
                                                             dtype=np.uint64)
    held: dict[str, list] = {"u": [], "v": [], "level": []}
    at = pending = 0

    def flush() -> None:
        nonlocal at, pending
        if not held["u"]:
            return
        rows = {k: np.concatenate(v) for k, v in held.items()}
        m = len(rows["u"])
        for k, data in rows.items():
            arrays[k].resize((at + m,))
            arrays[k][at:at + m] = data
            held[k].clear()
        at, pending = at + m, 0

    for level, grid in enumerate(grids):
        for node in itertools.product(*(range(g) for g in grid)):
            with np.load(work / "levels" / f"{node_name(level, node)}.merges.npz") as f:
                for key in held:
                    held[key].append(f[key])
                pending += len(f["u"])
                if len(f["pre_fragment"]):
                    order = np.argsort(f["pre_fragment"])
                    arrays["pre"].set_orthogonal_selection(
                        (f["pre_fragment"][order].astype(np.int64),), f["pre_rep"][order])
            if pending >= GRAPH_CHUNK:
                flush()
    flush()
    return at
