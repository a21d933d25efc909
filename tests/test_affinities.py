"""The affinity convention, checked once, centrally, against waterz."""

from __future__ import annotations

import numpy as np
import pytest
import waterz

from tokenunify import metrics
from tokenunify.affinities import (
    affinity_mask,
    class_balanced_weights,
    seg_to_affinities,
    widen_borders,
)


def test_convention_by_hand():
    lab = np.array([[[1, 1, 2]], [[1, 3, 2]]], np.uint64)  # (z=2, y=1, x=3)
    aff = seg_to_affinities(lab)
    assert aff.shape == (3, 2, 1, 3)
    # z channel at z=1 links (1, 0, x) with (0, 0, x)
    np.testing.assert_array_equal(aff[0, 1, 0], [1, 0, 1])
    # x channel at x links (z, 0, x) with (z, 0, x-1); x=0 is the first plane (= labels > 0)
    np.testing.assert_array_equal(aff[2, 0, 0], [1, 1, 0])
    np.testing.assert_array_equal(aff[2, 1, 0], [1, 0, 0])
    lab[1, 0, 0] = 0
    aff = seg_to_affinities(lab)
    assert aff[0, 1, 0, 0] == 0 and aff[2, 1, 0, 1] == 0  # label 0 never connects
    mask = affinity_mask(lab.shape)
    assert mask[0, 0].sum() == 0 and mask[2, :, :, 0].sum() == 0 and mask[1].sum() == 0


def test_ground_truth_affinities_give_back_the_ground_truth_through_waterz(tiny_em):
    """waterz reads our affinities with our meaning: perfect affinities -> the ground truth."""
    import cc3d

    # waterz's fragments are 6-connected components, so compare with those of the ground truth
    # (a neurite can leave the crop and come back as a second piece).
    lab = cc3d.connected_components(tiny_em["labels"], connectivity=6).astype(np.uint64)
    aff = seg_to_affinities(lab)
    seg = next(waterz.agglomerate(aff, [0.5]))
    s = metrics.evaluate(lab, seg.astype(np.uint64))
    assert s.voi < 1e-9 and s.arand < 1e-9
    # Shifting the affinities by one voxel along x (the wrong convention) breaks it.
    wrong = np.ascontiguousarray(np.roll(aff, 1, axis=3))
    seg_w = next(waterz.agglomerate(wrong, [0.5]))
    assert metrics.evaluate(lab, seg_w.astype(np.uint64)).voi > 0.05


def test_long_range_offsets():
    lab = np.arange(1, 9, dtype=np.uint64).repeat(4).reshape(1, 1, 32)
    aff = seg_to_affinities(lab, offsets=((0, 0, -4),))
    assert aff[0, 0, 0, 4:].sum() == 0 and aff[0, 0, 0, :4].all()
    with pytest.raises(ValueError, match="exactly one axis"):
        seg_to_affinities(lab, offsets=((0, -1, -1),))


def test_widen_borders():
    lab = np.ones((1, 5, 6), np.uint32)
    lab[:, :, 3:] = 2
    w = widen_borders(lab)
    np.testing.assert_array_equal(w[0, 0], [1, 1, 0, 0, 2, 2])
    lab[:, :, :] = 4
    np.testing.assert_array_equal(widen_borders(lab), lab)  # one object: nothing to widen
    lab[0, 2, 2] = 0
    assert widen_borders(lab).sum() == lab.sum()  # zeros alone do not count as another id


def test_class_balanced_weights():
    aff = np.zeros((3, 2, 4, 4), np.float32)
    aff[:, :, :, :1] = 1  # 25 % ones
    w = class_balanced_weights(aff)
    assert np.allclose(w[aff == 1], 3.0) and np.allclose(w[aff == 0], 1.0)
    w = class_balanced_weights(1 - aff)  # 75 % ones
    assert np.allclose(w[aff == 0], 1.0) and np.allclose(w[aff == 1], 3.0)
    assert np.allclose(class_balanced_weights(np.ones_like(aff)), 1.0)
