"""The evaluate stage: tidy metrics rows against skimage, ground-truth options, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from skimage.metrics import adapted_rand_error, variation_of_information

from tokenunify.affinities import widen_borders
from tokenunify.evaluate import COLUMNS, EvaluateConfig, run
from tokenunify.io.zarrio import create_volume
from tokenunify.settings import from_section


def write(tmp_path, labels, segs: dict, name="seg.zarr"):
    vol = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w")
    create_volume(vol, "labels", labels.shape, labels.shape, np.uint64, [40, 8, 8],
                  [0, 0, 0])[:] = labels
    root = zarr.open_group(str(tmp_path / name), mode="w")
    names = []
    for t, seg in segs.items():
        n = f"threshold_{t:.3f}"
        create_volume(root, n, seg.shape, seg.shape, np.uint64, [40, 8, 8], [0, 0, 0])[:] = seg
        names.append(n)
    root.attrs.update({"thresholds": list(segs), "arrays": names})
    return tmp_path / name, tmp_path / "vol.zarr"


@pytest.fixture
def volumes(tiny_em):
    gt = tiny_em["labels"].astype(np.uint64)
    rng = np.random.default_rng(0)
    merged = np.where(gt % 3 == 0, gt + 1, gt)  # merges some bodies
    split = gt * 2 + (rng.random(gt.shape) < 0.01)  # splits speckles off
    return gt, {0.3: split, 0.5: gt.copy(), 0.7: merged}


def test_rows_complete_and_equal_to_skimage(volumes, tmp_path):
    gt, segs = volumes
    seg, vol = write(tmp_path, gt, segs)
    df = run(seg, vol, tmp_path / "out" / "metrics.csv", "tokenunify", "demo_test")
    on_disk = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert list(on_disk.columns) == COLUMNS and len(on_disk) == 3
    assert list(on_disk["threshold"]) == [0.3, 0.5, 0.7]
    assert not list((tmp_path / "out").glob("*.tmp"))
    for row in df.itertuples():
        s = segs[row.threshold]
        split, merge = variation_of_information(gt, s, ignore_labels=(0,))
        assert row.voi_split == pytest.approx(split, abs=1e-9)
        assert row.voi_merge == pytest.approx(merge, abs=1e-9)
        assert row.arand == pytest.approx(adapted_rand_error(gt, s, ignore_labels=(0,))[0],
                                          abs=1e-9)
    assert df.loc[df.threshold == 0.5, "voi"].item() == 0


def test_erl_columns_from_skeletons(volumes, tmp_path):
    """With skeletons, each row's ERL figures are run_length's on the segment ids under the
    nodes; the ground truth scores NERL 1, the merged segmentation less."""
    from tokenunify.run_length import run_length
    from tokenunify.skeletons import SkeletonConfig, skeletonize_volume

    gt, segs = volumes
    seg, vol = write(tmp_path, gt, segs)
    sk = skeletonize_volume(vol, tmp_path / "vol.skeletons.npz", SkeletonConfig(dust_threshold=50))
    assert len(sk.ids) > 3
    df = run(seg, vol, tmp_path / "metrics.csv", "tokenunify", "demo_test",
             skeletons=tmp_path / "vol.skeletons.npz").set_index("threshold")
    assert df.loc[0.5, "nerl"] == pytest.approx(1.0)
    for t, s in segs.items():
        r = run_length(sk, s[tuple(sk.nodes.T)])
        assert df.loc[t, "erl_nm"] == pytest.approx(r.erl_nm)
        assert df.loc[t, "skeleton_merges"] == r.merging_segments
    assert df.loc[0.7, "nerl"] < 1 and df.loc[0.7, "skeleton_merges"] > 0
    assert set(df["erl_merge_rule"]) == {"segment"}
    # without skeletons the ERL columns are empty, the rest unchanged
    bare = run(seg, vol, tmp_path / "bare.csv", "tokenunify", "demo_test").set_index("threshold")
    assert bare["nerl"].isna().all()
    pd.testing.assert_series_equal(bare["voi"], df["voi"])


def test_skeletonize_needs_labels(tmp_path):
    from tokenunify.skeletons import skeletonize_volume

    zarr.open_group(str(tmp_path / "raw_only.zarr"), mode="w")
    with pytest.raises(ValueError, match="raw_only.zarr: no 'labels' array to skeletonize"):
        skeletonize_volume(tmp_path / "raw_only.zarr", tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def test_ground_truth_options_are_applied_and_recorded(volumes, tmp_path):
    gt, segs = volumes
    seg, vol = write(tmp_path, gt, segs)
    ids, counts = np.unique(gt[gt > 0], return_counts=True)
    min_size = int(np.sort(counts)[2]) + 1  # drops the 3 smallest bodies at least
    df = run(seg, vol, tmp_path / "m.csv", "e", "d",
             EvaluateConfig(gt_min_size=min_size, gt_border_width=1))
    prepared = widen_borders(gt, 1)
    pid, pc = np.unique(prepared, return_counts=True)
    prepared[np.isin(prepared, pid[(pc < min_size) & (pid > 0)])] = 0
    split, merge = variation_of_information(prepared, segs[0.7], ignore_labels=(0,))
    row = df[df.threshold == 0.7].iloc[0]
    assert row.voi_merge == pytest.approx(merge, abs=1e-9)
    assert row.gt_min_size == min_size and row.gt_border_width == 1


def test_bad_input_is_named(volumes, tmp_path):
    gt, segs = volumes
    seg, vol = write(tmp_path, gt[:, :-1], {0.5: segs[0.5]})
    with pytest.raises(ValueError, match=r"labels has shape \(16, 95, 96\).*threshold_0.500"):
        run(seg, vol, tmp_path / "m.csv", "e", "d")
    seg, vol = write(tmp_path, gt, {0.5: np.zeros_like(gt)})
    with pytest.raises(ValueError, match="threshold_0.500 is empty"):
        run(seg, vol, tmp_path / "m.csv", "e", "d")
    assert not (tmp_path / "m.csv").exists()
    with pytest.raises(ValueError, match="evaluate.gt_min_size: -1 is less than the minimum"):
        from_section(EvaluateConfig, {"gt_min_size": -1}, "evaluate")


def test_all_zero_labels_are_an_error_not_empty_metrics(volumes, tmp_path):
    """All-0 ground truth used to give a metrics.csv of empty values."""
    gt, segs = volumes
    seg, vol = write(tmp_path, np.zeros_like(gt), {0.5: segs[0.5]})
    with pytest.raises(ValueError, match=r"vol.zarr/labels of dataset 'd' has no labelled voxel "
                                         r"\(all 0\)"):
        run(seg, vol, tmp_path / "m.csv", "e", "d")
    assert not (tmp_path / "m.csv").exists()
