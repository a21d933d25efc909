"""ERL / NERL (tokenunify.run_length) on cases whose answer is known by hand, on kimimaro
skeletons of drawn tubes, and on the NeuroProof ground truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.conftest import NEUROPROOF, need
from tokenunify.run_length import run_length
from tokenunify.skeletons import SkeletonConfig, Skeletons, skeletonize


def line(n: int, body: int, start: int = 0, y: int = 0, step_nm: float = 10.0):
    """A straight skeleton of n nodes along x, 10 nm apart (nodes start..start+n-1)."""
    nodes = np.stack([np.zeros(n), np.full(n, y), np.arange(n)], axis=1)
    edges = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1) + start
    return nodes, np.full(n, body), edges, np.full(n - 1, step_nm)


def combine(*parts) -> Skeletons:
    return Skeletons(*(np.concatenate(p) for p in zip(*parts, strict=True)), (10, 10, 10))


def test_perfect_segmentation_gives_nerl_one():
    sk = combine(line(101, 1), line(51, 2, start=101, y=5))
    r = run_length(sk, sk.skeleton.copy() + 100)  # any ids, one per body
    assert r.nerl == pytest.approx(1.0)
    assert r.erl_nm == pytest.approx(r.max_erl_nm)
    assert r.max_erl_nm == pytest.approx((1000 ** 2 + 500 ** 2) / 1500)
    assert (r.split_edges, r.merging_segments, r.merged_skeletons, r.omitted_edges) == (0, 0, 0, 0)


def test_one_split_in_the_middle_halves_the_run_length():
    n = 1002  # 10.01 um along x, nodes 10 nm apart
    sk = combine(line(n, 1))
    seg = np.where(np.arange(n) <= 500, 7, 8)  # cut edge (500, 501): two runs of 5 um
    r = run_length(sk, seg)
    L, d = 10010.0, 10.0
    assert r.split_edges == 1
    assert r.erl_nm == pytest.approx(2 * ((L - d) / 2) ** 2 / L)  # the cut edge itself is lost
    assert r.nerl == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("rule", ["skeleton", "segment"])
def test_a_merge_of_two_skeletons_zeroes_both(rule):
    sk = combine(line(101, 1), line(101, 2, start=101, y=5), line(51, 3, start=202, y=9))
    seg = np.concatenate([np.full(101, 5), np.full(101, 5), np.full(51, 6)])
    r = run_length(sk, seg, rule)
    assert (r.merging_segments, r.merged_skeletons) == (1, 2)
    assert r.erl_nm == pytest.approx(500 ** 2 / 2500)  # only the third skeleton runs


def test_merge_rules_differ_on_a_partial_merge():
    """Skeleton 2 lies in segment 9 except its last 10 edges, which lie in skeleton 1's segment
    5: under the skeleton rule both score 0; under the segment rule only the edges in segment 5
    do, and skeleton 2 still runs its 90 edges in segment 9 (the edge from 9 into 5 is a split)."""
    sk = combine(line(101, 1), line(101, 2, start=101, y=5))
    seg = np.concatenate([np.full(101, 5), np.full(101, 9)])
    seg[101 + 91:] = 5
    strict, lenient = run_length(sk, seg, "skeleton"), run_length(sk, seg, "segment")
    assert strict.erl_nm == 0.0 and strict.merged_skeletons == 2
    assert lenient.split_edges == 1
    assert lenient.erl_nm == pytest.approx(900 ** 2 / 2000)
    with pytest.raises(ValueError, match="merge_rule"):
        run_length(sk, seg, "ffn")


def test_background_nodes_omit_their_edges_without_a_merge():
    sk = combine(line(11, 1), line(11, 2, start=11, y=5))
    seg = np.concatenate([np.full(11, 3), np.full(11, 4)])
    seg[[0, 11]] = 0  # a node of each in segment 0: no merge (funlib would call 0 merging)
    r = run_length(sk, seg)
    assert (r.omitted_edges, r.merged_skeletons) == (2, 0)
    assert r.erl_nm == pytest.approx(2 * 90 ** 2 / 200)


def test_bad_inputs_are_named():
    sk = combine(line(5, 1))
    with pytest.raises(ValueError, match="4 segment ids for 5 nodes"):
        run_length(sk, np.ones(4))
    with pytest.raises(ValueError, match="two different bodies"):
        Skeletons(np.zeros((2, 3)), [1, 2], [[0, 1]], [10.0], (10, 10, 10))


def tubes(shape=(24, 40, 160)):
    """Two straight tubes along x (bodies 1 and 2), radius 4 voxels."""
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint32)
    lab[(z - 12) ** 2 + (y - 10) ** 2 <= 16] = 1
    lab[(z - 12) ** 2 + (y - 30) ** 2 <= 16] = 2
    return lab


def test_kimimaro_skeletons_of_tubes_score_splits_and_merges(tmp_path):
    lab = tubes()
    sk = skeletonize(lab, (40, 10, 10), SkeletonConfig(dust_threshold=10))
    assert set(sk.ids.tolist()) == {1, 2}
    ids, lengths = sk.lengths()
    assert lengths == pytest.approx([1590, 1590], rel=0.05)  # 160 voxels of 10 nm, end to end
    sk = Skeletons.load(sk.save(tmp_path / "s.npz"))
    assert run_length(sk, sk.segments_at_nodes(lab)).nerl == pytest.approx(1.0)
    split = lab.copy()
    split[:, :, 80:][split[:, :, 80:] == 1] = 3  # tube 1 cut in the middle
    r = run_length(sk, sk.segments_at_nodes(split))
    assert r.split_edges == 1
    # ERL = sum of run^2 / (2 L): tube 1 runs L/2 twice (L^2 / 2), tube 2 runs L (L^2); the
    # max is 2 L^2 / (2 L), so NERL = (1/2 + 1) / 2
    assert r.nerl == pytest.approx(0.75, abs=0.01)
    merged = np.where(lab > 0, 1, 0)
    r = run_length(sk, sk.segments_at_nodes(merged))
    assert (r.erl_nm, r.merged_skeletons) == (0.0, 2)


def test_skeleton_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        Skeletons.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="other.npz: not a skeleton file"):
        Skeletons.load(tmp_path / "other.npz")


def _neuroproof_bodies(name: str) -> np.ndarray:
    import fastremap

    from tokenunify.io.remote import gunzip_cached

    with h5py.File(gunzip_cached(NEUROPROOF / name)) as f:
        stack, t = f["stack"][200:250], f["transforms"][:]
    lut = dict(zip(t[:, 0].tolist(), t[:, 1].tolist(), strict=True))
    return fastremap.remap(stack.astype(np.uint64), lut, preserve_missing_labels=True)


def test_neuroproof_ground_truth_and_its_supervoxels():
    """The test part's own ground truth scores NERL 1 under any relabelling; the supervoxels
    that ship with NeuroProof split it (and the ERL is below the max)."""
    need(NEUROPROOF)
    gt = _neuroproof_bodies("groundtruth.h5.gz")
    sk = skeletonize(gt, (10, 10, 10))
    assert len(sk.ids) > 20
    perm = np.random.default_rng(0).permutation(int(gt.max()) + 1).astype(np.uint64) + 1
    assert run_length(sk, perm[sk.segments_at_nodes(gt).astype(np.int64)]).nerl == 1.0
    sv = _neuroproof_bodies("oversegmented_stack_labels.h5.gz")
    r = run_length(sk, sk.segments_at_nodes(sv))
    assert r.split_edges > 0 and 0 < r.nerl < 1
