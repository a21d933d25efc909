"""The embedded EM-like generator: determinism, blockwise consistency, GT on the membranes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tokenunify.data.synthetic import SyntheticConfig, SyntheticEM, generate


def test_deterministic_for_a_seed_and_different_across_seeds(tiny_em):
    again = generate((16, 96, 96), seed=7)
    for k in ("raw", "labels"):
        np.testing.assert_array_equal(again[k], tiny_em[k])
    other = generate((16, 96, 96), seed=8)
    assert not np.array_equal(other["raw"], tiny_em["raw"])


def test_any_box_reads_the_same_voxels(tiny_em):
    gen = SyntheticEM(SyntheticConfig(shape=(16, 96, 96), seed=7), cache_bytes=1)
    box = (slice(3, 11), slice(20, 77), slice(5, 96))
    np.testing.assert_array_equal(gen.read("raw", box), tiny_em["raw"][box])
    np.testing.assert_array_equal(gen.read("labels", box), tiny_em["labels"][box])


def test_dense_labels_with_many_neurites(tiny_em):
    lab = tiny_em["labels"]
    assert lab.dtype == np.uint64 and (lab > 0).all()
    sizes = np.bincount(lab.ravel().astype(np.int64))
    assert (sizes > 0).sum() >= 8
    # Neurites run across sections: most labels of a section reappear in the next one.
    carried = np.isin(np.unique(lab[5]), np.unique(lab[6])).mean()
    assert carried > 0.8


def _boundaries(lab):
    """Voxels whose in-plane neighbour has another label."""
    b = np.zeros(lab.shape, bool)
    b[:, 1:, :] |= lab[:, 1:, :] != lab[:, :-1, :]
    b[:, :-1, :] |= lab[:, 1:, :] != lab[:, :-1, :]
    b[:, :, 1:] |= lab[:, :, 1:] != lab[:, :, :-1]
    b[:, :, :-1] |= lab[:, :, 1:] != lab[:, :, :-1]
    return b


def test_ground_truth_lines_up_with_dark_membranes(tiny_em):
    raw, lab, memb = tiny_em["raw"].astype(float), tiny_em["labels"], tiny_em["membrane"] > 0
    b = _boundaries(lab)
    assert memb[b].all(), "every label boundary lies on a rendered membrane"
    ok = raw.reshape(len(raw), -1).std(1) > 10  # skip defective (blank) sections
    interior = ~ndimage.binary_dilation(memb, np.ones((1, 5, 5)))
    assert raw[ok][b[ok]].mean() < 0.7 * raw[ok][interior[ok]].mean()
    # Shifting the labels by a few voxels breaks the alignment (the test can fail).
    shifted = _boundaries(np.roll(lab, 6, axis=2))
    assert raw[ok][shifted[ok]].mean() > raw[ok][b[ok]].mean() + 15


def test_defective_sections_occur():
    cfg = SyntheticConfig(shape=(60, 48, 48), seed=3, defect_rate=0.2)
    raw = SyntheticEM(cfg).read("raw", (slice(0, 60), slice(0, 48), slice(0, 48)))
    blank = (raw.reshape(60, -1).max(1) == 0).sum()
    assert 1 <= blank <= 25


@pytest.mark.parametrize("bad", [{"shape": "1,2"}, {"wobble": "1"}, {"shape": "0,4,4"}])
def test_bad_parameters_are_named(bad):
    with pytest.raises(ValueError, match="shape|wobble"):
        SyntheticConfig.from_query(bad)


def test_preview_montage_has_synthetic_and_real_rows(tmp_path):
    from conftest import SHARED_DATA

    from tokenunify.data.preview import save_preview

    out = save_preview(tmp_path / "p.png", SHARED_DATA, size=64)
    import imageio.v3 as iio

    img = iio.imread(out)
    assert img.shape[1] == 4 * 64 and img.shape[0] in (64, 128)
