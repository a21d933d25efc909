"""Augmentations keep raw and labels aligned, and each transform really transforms."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tokenunify.train.augment import AugmentConfig, augment

OFF = dict(flip=0, rotate=0, elastic=0, intensity=0, missing_section=0, misalign=0)


def paint(labels):
    """A raw image that is a fixed function of the labels."""
    return ((labels.astype(np.int64) * 37) % 251 / 251.0).astype(np.float32)


@pytest.mark.parametrize("which", ["flip", "rotate", "elastic", "misalign"])
def test_geometric_transforms_keep_labels_aligned(tiny_em, which):
    lab = tiny_em["labels"][:8, :64, :64].copy()
    raw = paint(lab)
    cfg = AugmentConfig(**{**OFF, which: 1.0, "raw_order": 0})
    changed = 0
    for seed in range(4):
        r, lb = augment(raw, lab, np.random.default_rng(seed), cfg)
        assert r.shape == lb.shape == lab.shape
        np.testing.assert_array_equal(r, paint(lb))  # same coordinates for both
        changed += not np.array_equal(lb, lab)
    assert changed >= 3  # the transform really moves things


def test_linear_raw_interpolation_stays_aligned(tiny_em):
    lab = tiny_em["labels"][:8, :64, :64].copy()
    raw = paint(lab)
    cfg = AugmentConfig(**{**OFF, "rotate": 1.0})
    r, lb = augment(raw, lab, np.random.default_rng(3), cfg)
    # away from label boundaries, linear interpolation of a piecewise-constant image is exact
    from scipy import ndimage
    inner = ndimage.minimum_filter(lb, size=(1, 5, 5)) == ndimage.maximum_filter(lb, size=(1, 5, 5))
    inner[:, :2] = inner[:, -2:] = inner[:, :, :2] = inner[:, :, -2:] = False  # edge modes differ
    assert inner.mean() > 0.5
    np.testing.assert_allclose(r[inner], paint(lb)[inner], atol=1e-5)


def test_intensity_and_missing_sections_touch_raw_only(tiny_em):
    lab = tiny_em["labels"][:8, :32, :32].copy()
    raw = paint(lab)
    cfg = AugmentConfig(**{**OFF, "intensity": 1.0, "missing_section": 1.0})
    r, lb = augment(raw, lab, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(lb, lab)
    assert not np.allclose(r, raw)
    assert (r.reshape(8, -1).max(1) == 0).sum() == 1  # one blanked section
    assert r.min() >= 0 and r.max() <= 1


def test_disabled_is_identity_and_shapes_checked(tiny_em):
    lab = tiny_em["labels"][:4, :16, :16].copy()
    raw = paint(lab)
    r, lb = augment(raw, lab, np.random.default_rng(0), AugmentConfig(**OFF))
    np.testing.assert_array_equal(r, raw)
    np.testing.assert_array_equal(lb, lab)
    with pytest.raises(ValueError, match="differ"):
        augment(raw, lab[:, :8], np.random.default_rng(0), dataclasses.replace(AugmentConfig()))
