"""Nearest-neighbour affinities: the one convention every stage relies on.

Affinities have 3 channels for the offsets (-1, 0, 0), (0, -1, 0), (0, 0, -1), in channel order
z, y, x, with values in [0, 1]. The affinity of offset o is stored at the voxel v it points
*from*: ``aff[c, v] = 1`` iff ``labels[v] == labels[v + o_c]`` and both are non-zero, i.e.
``aff[0, z, y, x]`` links (z, y, x) with (z - 1, y, x). This is waterz's convention (and the
official code's ``seg_to_aff`` with ``mknhood3d(1)``), so affinities go to waterz unchanged.

Ground-truth label 0 (background, membrane, unlabelled) never connects: every affinity touching
it is 0. The first plane of each channel has no neighbour inside the volume; it is set to
``labels > 0``, as in the official code, and :func:`affinity_mask` marks it (and nothing else) as
unknown so that losses can leave it out.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def seg_to_affinities(labels: np.ndarray, offsets=OFFSETS) -> np.ndarray:
    """(Z, Y, X) integer labels -> (len(offsets), Z, Y, X) float32 affinities in {0, 1}.

    Offsets must be negative along one axis (long-range ones such as (0, -3, 0) work too).
    """
    labels = np.asarray(labels)
    out = np.zeros((len(offsets),) + labels.shape, np.float32)
    fg = labels > 0
    for c, off in enumerate(offsets):
        axis = [i for i, o in enumerate(off) if o][0]
        d = -off[axis]
        if sum(bool(o) for o in off) != 1 or d <= 0:
            raise ValueError(f"offset {off} must be negative along exactly one axis")
        here = [slice(None)] * 3
        there = [slice(None)] * 3
        here[axis], there[axis] = slice(d, None), slice(None, -d)
        here, there = tuple(here), tuple(there)
        out[c][here] = (labels[here] == labels[there]) & fg[here] & fg[there]
        first = [slice(None)] * 3
        first[axis] = slice(0, d)
        out[c][tuple(first)] = fg[tuple(first)]
    return out


def affinity_mask(shape, offsets=OFFSETS) -> np.ndarray:
    """(C, Z, Y, X) float32: 0 on the planes whose neighbour lies outside the volume, else 1."""
    mask = np.ones((len(offsets),) + tuple(shape), np.float32)
    for c, off in enumerate(offsets):
        axis = [i for i, o in enumerate(off) if o][0]
        first = [slice(None)] * 3
        first[axis] = slice(0, -off[axis])
        mask[c][tuple(first)] = 0.0
    return mask


def widen_borders(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Set to 0 every voxel whose in-plane (2*width+1)^2 neighbourhood holds more than one
    non-zero id (the official ``seg_widen_border``): thin boundaries become ``width`` wider on
    each side, in every section. Returns a new array."""
    labels = np.asarray(labels)
    size = (1, 2 * width + 1, 2 * width + 1)
    hi = ndimage.maximum_filter(labels, size=size, mode="nearest")
    big = np.iinfo(labels.dtype).max if labels.dtype.kind in "iu" else np.inf
    lo = ndimage.minimum_filter(np.where(labels > 0, labels, big), size=size, mode="nearest")
    out = labels.copy()
    out[(hi != lo) & (lo != big)] = 0
    return out


def class_balanced_weights(aff: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Official ``weight_binary_ratio``: one weight for 1s and one for 0s over all channels.

    f = fraction of ones (among masked-in voxels) clipped to [0.05, 0.99]; if f > 0.5, ones get 1
    and zeros f / (1 - f), else ones (1 - f) / f and zeros 1. Masked-out voxels get weight 0.
    """
    m = np.ones_like(aff) if mask is None else mask
    n = m.sum()
    f = float(np.clip((aff * m).sum() / n if n else 0.5, 0.05, 0.99))
    w1, w0 = (1.0, f / (1 - f)) if f > 0.5 else ((1 - f) / f, 1.0)
    return (np.where(aff > 0.5, w1, w0) * m).astype(np.float32)
