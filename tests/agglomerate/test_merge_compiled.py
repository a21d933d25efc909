"""The compiled global merge (merge_cpu.cpp) against the Python reference: the identical merge
history (u, v, level) on random graphs full of ties, for both scoring functions (and the
quantile with per-sample histograms), and on real NeuroProof fragments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import NEUROPROOF, need
from tokenunify.agglomerate.merge import (
    agglomerate_graph,
    agglomerate_graph_python,
    compiled_extension,
)
from tokenunify.agglomerate.scoring import parse

QUANTILE = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256>>"
MEAN = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
HISTOGRAM = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 75, ScoreValue, 16, false>>"


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    if compiled_extension() is None:
        pytest.skip("the compiled merge does not build here (no compiler or ninja)")


def random_graph(n: int, m: int, seed: int, levels: int = 8):
    """A random fragment graph whose scores take only ``levels`` values (ties everywhere),
    with a two-bin histogram per edge."""
    rng = np.random.default_rng(seed)
    u, v = rng.integers(1, n + 1, m), rng.integers(1, n + 1, m)
    keep = u != v
    edges = pd.DataFrame({"u": np.minimum(u, v)[keep], "v": np.maximum(u, v)[keep]})
    edges = edges.drop_duplicates().reset_index(drop=True)
    count = rng.integers(1, 5, len(edges))
    edges["count"] = count
    edges["sum"] = rng.integers(0, levels, len(edges)) / levels * count
    edges["max"] = rng.integers(0, levels, len(edges)) / levels
    hist = pd.DataFrame({"u": np.repeat(edges["u"].to_numpy(), 2),
                         "v": np.repeat(edges["v"].to_numpy(), 2),
                         "bin": np.tile([3, 9], len(edges)),
                         "n": rng.integers(1, 4, 2 * len(edges))})
    return edges.sample(frac=1, random_state=seed), hist  # unsorted on purpose


def assert_same(edges, n, scoring, hist=None, max_threshold=0.9):
    ref = agglomerate_graph_python(edges, n, parse(scoring), max_threshold, hist)
    got = agglomerate_graph(edges, n, parse(scoring), max_threshold, hist, engine="compiled")
    assert len(ref.u) > 0
    np.testing.assert_array_equal(got.u, ref.u)
    np.testing.assert_array_equal(got.v, ref.v)
    np.testing.assert_array_equal(got.level, ref.level)
    assert got.u.dtype == ref.u.dtype == np.uint64


@pytest.mark.parametrize("scoring", [QUANTILE, MEAN, HISTOGRAM])
def test_identical_history_on_random_graphs_with_ties(scoring):
    for seed in range(12):
        n = (60, 300)[seed % 2]
        edges, hist = random_graph(n, 4 * n, seed)
        assert_same(edges, n, scoring, hist, max_threshold=(0.5, 0.9, 1.0)[seed % 3])


@pytest.mark.parametrize("scoring", [QUANTILE, MEAN])
def test_identical_history_when_one_region_absorbs_hundreds(scoring):
    """Hubs: a few fragments joined to hundreds of others by the lowest scores, the others in a
    ring by higher ones (with ties): a hub absorbs its leaves one by one, the case where the
    compiled merge searches the small neighbours' lists instead of marking the hub's."""
    rng = np.random.default_rng(7)
    n, hubs = 1200, (1, 2, 3)
    leaves = np.arange(4, n + 1)
    owner = rng.choice(hubs, len(leaves))
    u = np.r_[owner, leaves[:-1], hubs[:-1]]
    v = np.r_[leaves, leaves[1:], hubs[1:]]
    low = np.r_[np.full(len(leaves), 0.9), np.full(len(leaves) - 1, 0.3), [0.2, 0.2]]
    mean = np.round((low + rng.uniform(0, 0.05, len(low))) * 8) / 8  # ties
    count = rng.integers(1, 4, len(u))
    edges = pd.DataFrame({"u": np.minimum(u, v), "v": np.maximum(u, v), "count": count,
                          "sum": mean * count, "max": mean})
    assert_same(edges, n, scoring, max_threshold=0.95)


def test_identical_history_on_neuroproof_fragments(tmp_path):
    """Real fragments (NeuroProof supervoxels, z 100-124) and noisy affinities from the bodies."""
    import gzip
    import shutil

    import h5py

    from tests.agglomerate.test_agglomerate import noisy_affinities
    from tokenunify.agglomerate.graph import block_edges

    gz = need(NEUROPROOF) / "groundtruth.h5.gz"
    with gzip.open(gz, "rb") as f, open(tmp_path / "gt.h5", "wb") as g:
        shutil.copyfileobj(f, g)
    with h5py.File(tmp_path / "gt.h5", "r") as f:
        stack = f["stack"][100:124, 0:128, 0:128].astype(np.uint64)
        table = f["transforms"][:]
    lut = np.zeros(int(max(stack.max(), table[:, 0].max())) + 1, np.uint64)
    lut[table[:, 0]] = table[:, 1]
    aff = noisy_affinities(lut[stack], seed=2)
    ids, frag = np.unique(stack, return_inverse=True)
    frag = (frag.reshape(stack.shape) + 1).astype(np.uint64)
    edges, hist = block_edges(frag, aff, (0, 0, 0), histogram_bins=16)
    assert len(edges) > 1000
    for scoring in (QUANTILE, MEAN, HISTOGRAM):
        assert_same(edges, len(ids), scoring, hist)


def test_bad_edge_ids_are_named():
    edges = pd.DataFrame({"u": [1, 2], "v": [2, 9], "count": [1, 1], "sum": [0.5, 0.5],
                          "max": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"n_fragments \(5\).*v in \[2, 9\]"):
        agglomerate_graph(edges, 5, parse(MEAN), 0.9, engine="compiled")


def test_empty_graph_gives_an_empty_history():
    edges = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                          (("u", "int64"), ("v", "int64"), ("count", "int64"),
                           ("sum", "float64"), ("max", "float64"))})
    for scoring in (QUANTILE, MEAN):
        h = agglomerate_graph(edges, 3, parse(scoring), 0.9, engine="compiled")
        assert len(h.u) == 0 and h.lut(0.9).tolist() == [0, 1, 2, 3]
