"""Whole-volume agglomeration with waterz itself: the reference the blockwise path is checked
against, and the ``method: waterz`` option for volumes that fit in memory."""

from __future__ import annotations

import logging

import numpy as np

from tokenunify.agglomerate.fragments import distance_fragments, whole_volume_fragments
from tokenunify.agglomerate.scoring import DEFAULT

log = logging.getLogger(__name__)


def named_fragments(aff: np.ndarray, name: str) -> np.ndarray | None:
    """Whole-volume fragments (z, y, x) uint64 of the ``agglomerate.fragments`` method ``name``
    from (3, z, y, x) float32 affinities; None for ``"waterz"`` (waterz's own watershed, which
    stays inside ``waterz.agglomerate``)."""
    if name == "maxima_distance":
        return whole_volume_fragments(aff, tile=None)
    if name == "maxima_distance_3d":
        return distance_fragments(aff).astype(np.uint64)
    if name == "waterz":
        return None
    raise ValueError(f"agglomerate.fragments {name!r}: expected maxima_distance, "
                     "maxima_distance_3d or waterz")


def waterz_segmentations(aff: np.ndarray, thresholds, scoring: str = DEFAULT,
                         fragments: np.ndarray | str | None = "maxima_distance",
                         discretize_queue: int = 0) -> dict[float, np.ndarray]:
    """``waterz.agglomerate`` over all thresholds in one pass.

    Args:
        aff: (3, z, y, x) float32 affinities in [0, 1].
        thresholds: merge thresholds in [0, 1].
        scoring: waterz scoring-function name.
        fragments: a (z, y, x) uint64 fragment volume, ``"maxima_distance"`` (the official
            per-section seeded watershed, whole sections), ``"maxima_distance_3d"`` (the seeded
            watershed in 3-D, whole volume), or None / ``"waterz"`` for waterz's own watershed.
        discretize_queue: waterz's queue binning (0: exact priority queue; TokenUnify: 256).

    Returns:
        threshold -> (z, y, x) uint64 segmentation.
    """
    import waterz

    aff = np.ascontiguousarray(aff, dtype=np.float32)
    if isinstance(fragments, str):
        fragments = named_fragments(aff, fragments)
    ts = sorted(float(t) for t in thresholds)
    frag = None if fragments is None else np.array(fragments, dtype=np.uint64, copy=True)
    out = {}
    # waterz overwrites the fragments array in place: it gets its own copy (above)
    for t, seg in zip(ts, waterz.agglomerate(aff, ts, fragments=frag, scoring_function=scoring,
                                             discretize_queue=discretize_queue), strict=True):
        out[t] = seg.astype(np.uint64, copy=True)
    return out
