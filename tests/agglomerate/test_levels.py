"""The hierarchical merge on disk (agglomerate.hierarchy): the same segmentation as the flat
global merge, resume after a killed level, and bad input named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from tests.agglomerate.test_agglomerate import MEAN, THRESHOLDS, synthetic  # noqa: F401
from tests.conftest import NEUROPROOF, need
from tokenunify.agglomerate import AgglomerateConfig, down, run, threshold_name
from tokenunify.agglomerate import levels as lv
from tokenunify.agglomerate.scoring import DEFAULT


def segment(path, out, **kw):
    kw = {"block": (8, 64, 64), "tile": 64, "stitch_threshold": None, **kw}
    cfg = AgglomerateConfig(context=16, thresholds=THRESHOLDS, **kw)
    root = zarr.open_group(str(run(path, out, cfg)), mode="r")
    return {t: root[threshold_name(t)][:] for t in THRESHOLDS}


@pytest.mark.parametrize("scoring", [DEFAULT, MEAN])
def test_hierarchy_gives_the_flat_result(synthetic, tmp_path, scoring):  # noqa: F811
    """3 x 2 x 2 blocks under an octree (3 levels) and under [3, 2, 2] (leaves and a root): the
    segmentations equal the flat merge's at every threshold, voxel for voxel."""
    _, path, _ = synthetic
    flat = segment(path, tmp_path / "flat.zarr", scoring=scoring)
    for fan in ([2, 2, 2], [3, 2, 2]):
        hier = segment(path, tmp_path / f"h{fan[0]}.zarr", scoring=scoring, hierarchy=fan)
        for t in THRESHOLDS:
            assert np.array_equal(flat[t], hier[t]), (fan, t)
            assert len(np.unique(flat[t])) > 3


HISTOGRAM = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 75, ScoreValue, 16, false>>"


@pytest.mark.parametrize("scoring", [DEFAULT, MEAN, HISTOGRAM])
@pytest.mark.parametrize("tile", [64, 32])
def test_stitched_hierarchy_gives_the_flat_result(synthetic, tmp_path, scoring, tile):  # noqa: F811
    """With stitching across tile edges (the default stitch_threshold 0.5), the hierarchy
    equals the flat merge: groups of tile-split fragments that span blocks (tile = block: every
    group does) are completed in the node that holds all of their members, and until then
    their edges go up raw. Checked to stitch something and to differ from not stitching."""
    _, path, _ = synthetic
    kw = {"scoring": scoring, "tile": tile, "stitch_threshold": 0.5}
    flat = segment(path, tmp_path / "flat.zarr", **kw)
    if scoring != HISTOGRAM:  # (on 16 bins at quantile 75 stitching changes nothing here)
        unstitched = segment(path, tmp_path / "raw.zarr", scoring=scoring, tile=tile)
        assert any(not np.array_equal(flat[t], unstitched[t]) for t in THRESHOLDS)
    for fan in ([2, 2, 2], [3, 2, 2]):
        hier = segment(path, tmp_path / f"h{fan[0]}.zarr", hierarchy=fan, **kw)
        for t in THRESHOLDS:
            assert np.array_equal(flat[t], hier[t]), (fan, t)


def test_stitched_hierarchy_on_real_neuroproof(tmp_path):
    """The same on NeuroProof's labels (noisy affinities from them, as the chunk-invariance
    test): 24 x 128 x 128 voxels in 3 x 2 x 2 blocks of tiles of 32, stitched at 0.5."""
    import gzip
    import shutil

    import h5py

    from tests.agglomerate.test_agglomerate import noisy_affinities, write_affinities

    gz = need(NEUROPROOF) / "groundtruth.h5.gz"
    h5 = tmp_path / "gt.h5"
    with gzip.open(gz, "rb") as f, open(h5, "wb") as g:
        shutil.copyfileobj(f, g)
    with h5py.File(h5, "r") as f:
        labels = f["stack"][100:124, 0:128, 0:128].astype(np.uint64)
    path, _ = write_affinities(tmp_path / "np.zarr", noisy_affinities(labels, seed=1))
    kw = {"tile": 32, "stitch_threshold": 0.5}
    flat = segment(path, tmp_path / "flat.zarr", **kw)
    hier = segment(path, tmp_path / "h.zarr", hierarchy=[2, 2, 2], **kw)
    for t in THRESHOLDS:
        assert np.array_equal(flat[t], hier[t]), t
        assert len(np.unique(flat[t])) > 3


def test_hierarchy_output_graph_gives_its_segmentation(synthetic, tmp_path):  # noqa: F811
    """The output's merge graph (u, v, level, pre), written node by node, gives back every
    threshold's segmentation through MergeHistory.lut, as the flat merge's does; a killed
    pass of segment ids going down resumes to the same result, and a graph written in many
    small pieces is the same graph."""
    from tokenunify.agglomerate.merge import MergeHistory

    _, path, _ = synthetic
    kw = {"tile": 32, "stitch_threshold": 0.5, "hierarchy": [2, 2, 2]}
    whole = segment(path, tmp_path / "a.zarr", **kw)
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    g = root["graph"]
    history = MergeHistory(g["u"][:], g["v"][:], g["level"][:], int(g.attrs["n_fragments"]),
                           g["pre"][:])
    assert (history.pre != np.arange(len(history.pre))).any()  # something was stitched
    frag = root["fragments"][:].astype(np.int64)
    for t in THRESHOLDS:
        assert np.array_equal(history.lut(t)[frag], whole[t]), t

    real, calls = down.down_task, []

    def dying(work, level, node, *a, **k):
        if calls:
            raise RuntimeError("killed")
        calls.append(node)
        return real(work, level, node, *a, **k)

    import tokenunify.agglomerate.blockwise as bw

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(down, "down_task", dying)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            segment(path, tmp_path / "b.zarr", **kw)
    finally:
        monkeypatch.undo()
    assert bw.down.down_task is real
    monkeypatch.setattr(down, "GRAPH_CHUNK", 7)  # the graph written in many small pieces
    try:
        again = segment(path, tmp_path / "b.zarr", **kw)
    finally:
        monkeypatch.undo()
    for t in THRESHOLDS:
        assert np.array_equal(whole[t], again[t]), t
    g2 = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["graph"]
    assert g2["u"].chunks == (7,)
    for k in ("u", "v", "level", "pre"):
        assert np.array_equal(g2[k][:], g[k][:]), k


def test_killed_level_resumes_to_the_same_result(synthetic, tmp_path, monkeypatch):  # noqa: F811
    _, path, _ = synthetic
    whole = segment(path, tmp_path / "a.zarr", hierarchy=[2, 2, 2], stitch_threshold=0.5)
    real, calls = lv.node_task, []

    def dying(work, level, node, *a, **k):
        if level == 1 and len(calls) >= 1:
            raise RuntimeError("killed")
        calls.append((level, node)) if level == 1 else None
        return real(work, level, node, *a, **k)

    monkeypatch.setattr(lv, "node_task", dying)
    cfg = dict(hierarchy=[2, 2, 2], stitch_threshold=0.5)
    with pytest.raises(RuntimeError, match="killed"):
        segment(path, tmp_path / "b.zarr", **cfg)
    done0 = list((tmp_path / "b.zarr.partial" / ".work" / ".done" / "level0").iterdir())
    assert len(done0) == 12  # every block of level 0 finished before level 1 started
    monkeypatch.setattr(lv, "node_task", real)
    again = segment(path, tmp_path / "b.zarr", **cfg)
    for t in THRESHOLDS:
        assert np.array_equal(whole[t], again[t]), t


def test_bad_hierarchies_and_tables_are_named(synthetic, tmp_path):  # noqa: F811
    _, path, _ = synthetic
    with pytest.raises(ValueError, match=r"hierarchy \[2, 2\]"):
        AgglomerateConfig(hierarchy=[2, 2], stitch_threshold=None)
    with pytest.raises(ValueError, match="not all 1"):
        AgglomerateConfig(hierarchy=[1, 1, 1], stitch_threshold=None)
    with pytest.raises(ValueError, match="y has 2 blocks but 1 child per node"):
        lv.level_grids((3, 2, 2), (3, 1, 1))
    # an edge table naming a fragment above the fragment count
    cfg = AgglomerateConfig(block=(8, 64, 64), tile=64, context=16, thresholds=THRESHOLDS,
                            stitch_threshold=None, hierarchy=[2, 2, 2])
    run(path, tmp_path / "c.zarr", cfg, phase="edges")
    edges_dir = tmp_path / "c.zarr.partial" / ".work" / "edges"
    table = edges_dir / "1_0_1.parquet"
    e = pd.read_parquet(table)
    e.loc[e.index[0], "v"] = 10 ** 9
    e.to_parquet(table)
    with pytest.raises(ValueError, match=r"edge table of block \[1, 0, 1\] has edge "
                                         r"\(\d+, 1000000000\); ids must satisfy"):
        run(path, tmp_path / "c.zarr", cfg)
    # a missing edge table
    table.unlink()
    with pytest.raises(FileNotFoundError, match=r"edge table of block \[1, 0, 1\] is missing"):
        run(path, tmp_path / "c.zarr", cfg)


@pytest.mark.parametrize("scoring", [DEFAULT, MEAN])
def test_compiled_node_step_equals_the_python_one(scoring):
    """The node step in C++ (merge_cpu.cpp with keys, stored scores, stale flags and a frozen
    mask) against merge.merge_node: the same merges and the same residual table, on random
    graphs with tied scores, stale edges and random frozen segments."""
    from tests.agglomerate.test_merge_compiled import random_graph
    from tokenunify.agglomerate.merge import NodeGraph, compiled_extension
    from tokenunify.agglomerate.scoring import parse

    if compiled_extension() is None:
        pytest.skip("the compiled merge does not build here")
    s = parse(scoring)
    for seed in range(8):
        edges, _ = random_graph(120, 480, seed)
        edges = edges.sort_values(["u", "v"]).reset_index(drop=True)
        df, hist = lv._to_frames(NodeGraph.from_edges(edges, s), s)
        rng = np.random.default_rng(seed)
        stale = rng.random(len(df)) < 0.2  # handed up stale, with a lower stored score
        df.loc[stale, "score"] -= 0.05
        df["stale"] = stale
        # few frozen: on these graphs' tied scores most segments are tied to a frozen one
        frozen = set(rng.choice(np.arange(1, 121), 3, replace=False).tolist())
        if seed % 2:  # large ids: the kernel works on the node's segments renumbered
            big = 1_000_000_000
            df[["u", "v", "k0", "k1"]] += big
            if hist is not None:
                hist[["k0", "k1"]] += big
            frozen = {f + big for f in frozen}
        got = lv.merge_frames(df, hist, set(frozen), s, 0.8, engine="compiled")
        ref = lv.merge_frames(df, hist, set(frozen), s, 0.8, engine="python")
        assert len(ref[0][0]) > 10, seed
        for a, b in zip(got[0], ref[0], strict=True):
            np.testing.assert_array_equal(a, b)
        cols = list(ref[1].columns)
        a = got[1][cols].sort_values(["k0", "k1"]).reset_index(drop=True)
        b = ref[1][cols].sort_values(["k0", "k1"]).reset_index(drop=True)
        assert len(b) > 0
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
        if scoring == DEFAULT:
            ha = got[2].sort_values(["k0", "k1", "bin"]).reset_index(drop=True)
            hb = ref[2].sort_values(["k0", "k1", "bin"]).reset_index(drop=True)
            pd.testing.assert_frame_equal(ha, hb, check_dtype=False)


@pytest.mark.parametrize("scoring", [DEFAULT, MEAN, "OneMinus<HistogramQuantileAffinity<"
                                     "RegionGraphType, 75, ScoreValue, 16, false>>",
                                     DEFAULT.replace(" 50,", " 100,")])
def test_leaf_tables_are_the_initial_states(scoring):
    """The vectorised leaf table equals the scoring's own initial states and scores."""
    from tests.agglomerate.test_merge_compiled import random_graph
    from tokenunify.agglomerate.merge import NodeGraph
    from tokenunify.agglomerate.scoring import parse

    s = parse(scoring)
    edges, hist = random_graph(100, 400, 3)
    edges = edges.sort_values(["u", "v"]).reset_index(drop=True)
    got, got_h = lv._leaf_frames(edges, hist if s.needs_histogram else None, s)
    ref, ref_h = lv._to_frames(NodeGraph.from_edges(edges, s, hist), s)
    pd.testing.assert_frame_equal(got[list(ref.columns)], ref, check_dtype=False)
    if ref_h is not None:
        key = ["k0", "k1", "bin"]
        pd.testing.assert_frame_equal(got_h.sort_values(key).reset_index(drop=True),
                                      ref_h.sort_values(key).reset_index(drop=True),
                                      check_dtype=False)


def test_edge_histograms_taken_in_order_or_joined(monkeypatch):
    """A node's histogram table in edge order is taken as it is (no join); shuffled, or with
    an edge missing, it is joined on the key: the same CSR either way."""
    rng = np.random.default_rng(0)
    k0 = np.sort(rng.choice(np.arange(1, 5000), 300, replace=False))
    k1 = k0 + rng.integers(1, 50, 300)
    key = (k0 << 32) | k1
    lens = rng.integers(1, 6, 300)
    bins = np.concatenate([np.sort(rng.choice(256, n, replace=False)) for n in lens])
    hist = pd.DataFrame({"k0": np.repeat(k0, lens), "k1": np.repeat(k1, lens), "bin": bins,
                         "n": rng.integers(1, 9, len(bins))})
    joins = []
    merge = pd.DataFrame.merge
    monkeypatch.setattr(pd.DataFrame, "merge", lambda *a, **k: joins.append(1) or merge(*a, **k))
    want = lv._edge_histograms(key, hist)
    assert not joins  # taken as it is
    np.testing.assert_array_equal(want[0], np.concatenate([[0], np.cumsum(lens)]))
    got = lv._edge_histograms(key, hist.sample(frac=1.0, random_state=1))
    assert joins  # joined
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    gone = hist[hist["k0"] != k0[7]]  # edge 7 without a histogram: an empty one
    got = lv._edge_histograms(key, gone)
    assert got[0][8] == got[0][7] and got[0][-1] == len(gone)
