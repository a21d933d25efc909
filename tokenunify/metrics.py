"""Segmentation metrics: VOI split / merge and adapted Rand error, from one sparse table.

Definitions (those of waterz's ``evaluate`` and CREMI: VOI in bits, ARAND = 1 - Rand F-score),
with ``gt`` the ground truth and ``seg`` the segmentation, voxels where ``gt`` is in ``ignore``
(default 0) left out, and ``n_ij`` the number of voxels with gt label i and seg label j (N in
all, row sums a_i, column sums b_j)::

    VOI split = H(seg | gt) = sum_ij n_ij/N * log2(a_i / n_ij)   (over-segmentation)
    VOI merge = H(gt | seg) = sum_ij n_ij/N * log2(b_j / n_ij)   (under-segmentation)
    VOI       = split + merge
    ARAND     = 1 - F,  F = sum(n_ij^2 - n_ij) / (0.5 * sum(a_i^2 - a_i) + 0.5 * sum(b_j^2 - b_j))

These equal ``skimage.metrics.variation_of_information(gt, seg, ignore_labels=(0,))`` and
``skimage.metrics.adapted_rand_error(gt, seg, ignore_labels=(0,))[0]`` (SNEMI3D / CREMI
convention). With no voxel left after ignoring, every metric is NaN, as in skimage; ARAND is also
NaN when no pair of voxels exists.

The contingency table is built from compact relabelled ids (fastremap) with one ``bincount``, so
uint64 ids of any size work, and it can be accumulated block by block
(:func:`contingency_blockwise`): memory is bounded by the block and the number of distinct
(gt, seg) pairs, not by the volume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import fastremap
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# the columns of metrics.csv (evaluate writes them, the report reads them), one row per threshold;
# the ERL columns (tokenunify.run_length) are empty when skeletons are off
COLUMNS = ["experiment", "dataset", "threshold", "voi_split", "voi_merge", "voi", "arand",
           "erl_nm", "max_erl_nm", "nerl", "skeleton_splits", "skeleton_merges",
           "erl_merge_rule", "n_segments", "gt_min_size", "gt_border_width"]
ERL_COLUMNS = ["erl_nm", "max_erl_nm", "nerl", "skeleton_splits", "skeleton_merges",
               "erl_merge_rule"]  # absent from files written before they existed
TEXT_COLUMNS = ["experiment", "dataset", "erl_merge_rule"]


@dataclass(frozen=True)
class Contingency:
    """Sparse contingency table: parallel arrays of gt id, seg id and voxel count."""

    gt: np.ndarray  # uint64 (M,)
    seg: np.ndarray  # uint64 (M,)
    count: np.ndarray  # int64 (M,)

    @property
    def n(self) -> int:
        return int(self.count.sum())


@dataclass(frozen=True)
class Scores:
    """Metric values (lower is better except the two Rand scores)."""

    voi_split: float
    voi_merge: float
    voi: float
    arand: float
    rand_split_score: float  # fraction of gt-together pairs kept together (1 = no splits)
    rand_merge_score: float  # fraction of seg-together pairs that are correct (1 = no merges)
    n_voxels: int

    def as_dict(self) -> dict:
        return asdict(self)


def _compact(a: np.ndarray, keep_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(compact ids, original id of each compact id); with keep_zero, 0 stays compact id 0."""
    ren, mapping = fastremap.renumber(a, start=1 if keep_zero else 0, preserve_zero=keep_zero,
                                      in_place=False)
    n = int(max(mapping.values(), default=0)) + 1
    inv = np.zeros(n, np.uint64)
    inv[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(
        mapping.keys(), np.uint64, len(mapping))
    return ren, inv


def contingency(gt: np.ndarray, seg: np.ndarray, ignore: Iterable[int] = (0,)) -> Contingency:
    """Contingency table of two label arrays of equal shape (any integer dtype).

    Voxels whose gt label is in ``ignore`` are left out. With the default ``ignore=(0,)`` no
    voxel is copied out: gt id 0 keeps compact id 0 and its row is dropped from the counts.
    """
    if gt.shape != seg.shape:
        raise ValueError(f"gt shape {gt.shape} and seg shape {seg.shape} differ")
    g = np.ascontiguousarray(gt).ravel()
    s = np.ascontiguousarray(seg).ravel()
    ignore = tuple(ignore)
    drop_zero = ignore == (0,)
    if ignore and not drop_zero:
        keep = ~np.isin(g, ignore)
        g, s = g[keep], s[keep]
    empty = np.zeros(0, np.uint64)
    if g.size == 0:
        return Contingency(empty, empty.copy(), np.zeros(0, np.int64))
    gc, ginv = _compact(g, keep_zero=drop_zero)
    sc, sinv = _compact(s)
    ns = len(sinv)
    code = gc.astype(np.int64)
    code *= ns
    code += sc
    if len(ginv) * ns <= 4 * code.size:
        counts = np.bincount(code, minlength=len(ginv) * ns)
        if drop_zero:
            counts[:ns] = 0  # gt id 0 is compact id 0: its row is ignored
        code = np.flatnonzero(counts)
        counts = counts[code]
    else:
        code, counts = np.unique(code, return_counts=True)
        if drop_zero:
            nz = code >= ns
            code, counts = code[nz], counts[nz]
    return Contingency(ginv[code // ns], sinv[code % ns], counts.astype(np.int64))


def merge(tables: Iterable[Contingency]) -> Contingency:
    """Sum several contingency tables (e.g. one per block)."""
    tables = list(tables)
    if len(tables) == 1:
        return tables[0]
    df = pd.DataFrame({"gt": np.concatenate([t.gt for t in tables]),
                       "seg": np.concatenate([t.seg for t in tables]),
                       "count": np.concatenate([t.count for t in tables])})
    df = df.groupby(["gt", "seg"], sort=False, as_index=False)["count"].sum()
    return Contingency(df["gt"].to_numpy(np.uint64), df["seg"].to_numpy(np.uint64),
                       df["count"].to_numpy(np.int64))


def contingency_blockwise(gt, seg, block=(64, 512, 512), ignore: Iterable[int] = (0,),
                          progress: bool | None = None) -> Contingency:
    """Contingency table of two (z, y, x) arrays read block by block (zarr, h5py, numpy).

    Memory is bounded by one block plus the table; partial tables are merged every 64 blocks.
    """
    from tokenunify.io.zarrio import blocks

    if tuple(gt.shape) != tuple(seg.shape):
        raise ValueError(f"gt shape {gt.shape} and seg shape {seg.shape} differ")
    pending: list[Contingency] = []
    boxes = list(blocks(gt.shape, block))
    for _, box in tqdm(boxes, desc="contingency", disable=None if progress is None
                       else not progress):
        pending.append(contingency(np.asarray(gt[box]), np.asarray(seg[box]), ignore))
        if len(pending) >= 64:
            pending = [merge(pending)]
    return merge(pending) if pending else contingency(np.zeros(0), np.zeros(0), ignore)


def _plogp_terms(counts: np.ndarray, totals: np.ndarray, n: float) -> float:
    return float(np.sum(counts / n * np.log2(totals / counts)))


def scores(table: Contingency) -> Scores:
    """VOI split/merge/total and ARAND (plus Rand split/merge scores) from a table."""
    n = table.n
    if n == 0:
        nan = float("nan")  # nothing to compare: undefined, as in skimage
        return Scores(nan, nan, nan, nan, nan, nan, 0)
    c = table.count.astype(np.float64)
    _, gi = np.unique(table.gt, return_inverse=True)
    _, si = np.unique(table.seg, return_inverse=True)
    a = np.bincount(gi, weights=c)  # gt sizes
    b = np.bincount(si, weights=c)  # seg sizes
    split = _plogp_terms(c, a[gi], n)
    merge_ = _plogp_terms(c, b[si], n)
    sum_ij = float(c @ c) - n
    sum_a = float(a @ a) - n
    sum_b = float(b @ b) - n
    denom = 0.5 * sum_a + 0.5 * sum_b
    with np.errstate(invalid="ignore", divide="ignore"):
        f = sum_ij / denom if denom else float("nan")
        rs = sum_ij / sum_a if sum_a else float("nan")
        rm = sum_ij / sum_b if sum_b else float("nan")
    return Scores(split, merge_, split + merge_, 1.0 - f, rs, rm, n)


def evaluate(gt, seg, ignore: Iterable[int] = (0,), block=None) -> Scores:
    """Scores of ``seg`` against ``gt``; with ``block`` the arrays are read block by block."""
    if block is None:
        return scores(contingency(np.asarray(gt), np.asarray(seg), ignore))
    return scores(contingency_blockwise(gt, seg, block, ignore))
