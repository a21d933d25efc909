"""tokenunify.metrics against skimage.metrics and waterz.evaluate (agreement to 1e-9)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import waterz
from conftest import GALA, NEUROPROOF, need
from skimage.metrics import adapted_rand_error, variation_of_information

from tokenunify import metrics


def reference(gt, seg):
    split, merge = variation_of_information(gt, seg, ignore_labels=(0,))
    are = adapted_rand_error(gt, seg, ignore_labels=(0,))[0]
    return split, merge, are


def check_against_skimage(gt, seg):
    s = metrics.evaluate(gt, seg)
    split, merge, are = reference(gt, seg)
    assert s.voi_split == pytest.approx(split, abs=1e-9)
    assert s.voi_merge == pytest.approx(merge, abs=1e-9)
    assert s.voi == pytest.approx(split + merge, abs=1e-9)
    if np.isnan(are):
        assert np.isnan(s.arand)
    else:
        assert s.arand == pytest.approx(are, abs=1e-9)
    return s


@pytest.mark.parametrize("seed", range(5))
def test_random_labels_match_skimage(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(3, 20, 3))
    gt = rng.integers(0, rng.integers(2, 30), shape).astype(np.uint64)
    seg = rng.integers(0, rng.integers(2, 30), shape).astype(np.uint64)
    check_against_skimage(gt, seg)


def test_voi_matches_waterz_evaluate(tiny_em):
    gt = tiny_em["labels"].astype(np.uint64)
    gt[tiny_em["membrane"] > 0] = 0  # waterz ignores gt 0 as we do
    seg = (gt // 3).astype(np.uint64)  # merges
    seg[:, :, :48] += 1000  # and splits along a plane
    w = waterz.evaluate(seg, gt)
    s = metrics.evaluate(gt, seg)
    assert s.voi_split == pytest.approx(w["voi_split"], abs=1e-9)
    assert s.voi_merge == pytest.approx(w["voi_merge"], abs=1e-9)
    check_against_skimage(gt, seg)


def test_split_and_merge_are_not_swapped():
    gt = np.ones((2, 4, 4), np.uint64)
    seg = np.arange(1, 33, dtype=np.uint64).reshape(2, 4, 4)  # every voxel split
    s = metrics.evaluate(gt, seg)
    assert s.voi_split == pytest.approx(5.0) and s.voi_merge == 0.0
    s = metrics.evaluate(seg, gt)  # swap roles: now all merged
    assert s.voi_merge == pytest.approx(5.0) and s.voi_split == 0.0


@pytest.mark.parametrize("case", ["identical", "all_merged", "all_split", "single_label",
                                  "gt_zero_only_partly"])
def test_edge_cases_match_skimage(case, rng):
    gt = rng.integers(1, 6, (4, 8, 8)).astype(np.uint64)
    if case == "identical":
        seg = gt.copy()
    elif case == "all_merged":
        seg = np.ones_like(gt)
    elif case == "all_split":
        seg = np.arange(1, gt.size + 1, dtype=np.uint64).reshape(gt.shape)
    elif case == "single_label":
        gt = np.full_like(gt, 3)
        seg = np.full_like(gt, 9)
    else:
        gt[:2] = 0
        seg = rng.integers(0, 3, gt.shape).astype(np.uint64)
    s = check_against_skimage(gt, seg)
    if case in ("identical", "single_label"):
        assert s.voi == 0 and s.arand == 0


def test_empty_volume():
    """All voxels ignored: every metric is undefined (NaN), as skimage's are."""
    gt = np.zeros((2, 3, 3), np.uint64)
    seg = np.ones_like(gt)
    s = metrics.evaluate(gt, seg)
    with np.errstate(invalid="ignore"):
        split, merge = variation_of_information(gt, seg, ignore_labels=(0,))
    assert np.isnan(split) and np.isnan(merge)
    assert np.isnan(s.voi_split) and np.isnan(s.voi_merge) and np.isnan(s.voi)
    assert np.isnan(s.arand) and s.n_voxels == 0


def test_huge_uint64_ids_and_relabel_invariance(rng):
    gt = rng.integers(1, 8, (6, 10, 10)).astype(np.uint64)
    seg = rng.integers(1, 8, gt.shape).astype(np.uint64)
    big = np.uint64(2**63 + 12345)
    s1 = metrics.evaluate(gt, seg)
    s2 = metrics.evaluate(gt * np.uint64(2**40) + big, seg + np.uint64(2**64 - 100))
    assert s1.voi == pytest.approx(s2.voi, abs=1e-12)
    assert s1.arand == pytest.approx(s2.arand, abs=1e-12)


def test_blockwise_equals_whole(tiny_em, rng):
    gt = tiny_em["labels"]
    seg = gt.copy()
    seg[rng.random(gt.shape) < 0.05] = 77
    whole = metrics.evaluate(gt, seg)
    for block in [(4, 32, 32), (5, 17, 96), (16, 96, 96)]:
        part = metrics.evaluate(gt, seg, block=block)
        assert part.voi == pytest.approx(whole.voi, abs=1e-9)
        assert part.arand == pytest.approx(whole.arand, abs=1e-9)


def test_gala_real_volume_matches_skimage_and_waterz():
    """Real FIB-SEM ground truth (gala) against its own watershed fragments."""
    need(GALA)
    with h5py.File(GALA / "train-gt.lzf.h5") as f:
        gt = f["stack"][:].astype(np.uint64)
    with h5py.File(GALA / "train-ws.lzf.h5") as f:
        ws = f["stack"][:].astype(np.uint64)
    s = check_against_skimage(gt, ws)
    w = waterz.evaluate(ws, gt)
    assert s.voi_split == pytest.approx(w["voi_split"], abs=1e-9)
    assert s.voi_merge == pytest.approx(w["voi_merge"], abs=1e-9)
    assert s.voi_split > s.voi_merge  # fragments over-segment


def test_neuroproof_real_volume_matches_skimage(tmp_path):
    """NeuroProof bodies vs its oversegmentation, through the gzip-HDF5 reader path."""
    need(NEUROPROOF)
    from tokenunify.io.remote import gunzip_cached

    def bodies(name):
        with h5py.File(gunzip_cached(NEUROPROOF / name)) as f:
            stack, t = f["stack"][:64, :128, :128], f["transforms"][:]
        lut = dict(zip(t[:, 0].tolist(), t[:, 1].tolist(), strict=True))
        import fastremap
        return fastremap.remap(stack.astype(np.uint64), lut, preserve_missing_labels=True)

    gt, seg = bodies("groundtruth.h5.gz"), bodies("oversegmented_stack_labels.h5.gz")
    check_against_skimage(gt, seg)
