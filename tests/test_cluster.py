"""Batches and Dask clusters of the blockwise stages (tokenunify/cluster.py).

A stage split into batch jobs must write exactly what one job writes; the SLURMCluster path is
tested against a real Slurm in tests/test_slurm.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

from tests.agglomerate.test_agglomerate import THRESHOLDS, noisy_affinities, write_affinities
from tokenunify import inference
from tokenunify.agglomerate import AgglomerateConfig, run, threshold_name
from tokenunify.cluster import DaskConfig, batch_of, block_count, n_batches, worker_jobs
from tokenunify.errors import ConfigError
from tokenunify.inference import InferConfig
from tokenunify.settings import from_section


def test_batch_plan():
    grid = list(range(10))
    assert n_batches(10, 4) == 3 and n_batches(10, None) == 1 and n_batches(100_000, 1000) == 100
    assert [batch_of(grid, b, 4) for b in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batch_of(grid, None, 4) == grid and batch_of(grid, 3, 4) == []  # past the plan
    assert block_count((3200, 10240, 6400), (32, 256, 256)) == 100_000
    assert worker_jobs(DaskConfig(cluster="slurm", max_jobs=8), 3) == 3
    assert worker_jobs(DaskConfig(cluster="slurm", max_jobs=8, processes=2), 100) == 8


def test_bad_dask_settings_are_named():
    """Single values are checked by the schema on the way in (settings.from_section, which
    the CLI uses for every stage); the dataclass checks what spans fields."""
    with pytest.raises(ConfigError, match=r"infer.dask.cluster: 'pbs' is not one of"):
        from_section(InferConfig, {"dask": {"cluster": "pbs"}}, "infer")
    with pytest.raises(ValueError, match="dask.address"):
        DaskConfig(cluster="address")
    with pytest.raises(ConfigError, match=r"agglomerate.dask: unknown key 'cpus'"):
        from_section(AgglomerateConfig, {"dask": {"cpus": 4}}, "agglomerate")
    with pytest.raises(ConfigError, match="agglomerate.scheduler: 'tcp://127.0.0.1:8786' is not"):
        from_section(AgglomerateConfig, {"scheduler": "tcp://127.0.0.1:8786"}, "agglomerate")


def test_agglomerate_in_batches_equals_one_job(tmp_path):
    from tokenunify.data.synthetic import generate

    labels = generate((16, 128, 128), seed=3)["labels"]
    path, _ = write_affinities(tmp_path / "affinities.zarr", noisy_affinities(labels))
    cfg = AgglomerateConfig(block=(8, 64, 64), tile=64, context=16, thresholds=THRESHOLDS,
                            batch_blocks=3)  # 8 blocks: batches of 3, 3, 2
    whole = zarr.open_group(str(run(path, tmp_path / "one.zarr", cfg)), mode="r")
    out = tmp_path / "batched.zarr"
    for phase in ("fragments", "edges", "merge", "relabel"):
        for b in ([None] if phase == "merge" else range(3)):
            staged = run(path, out, cfg, phase=phase, batch=b)
            assert staged.name == "batched.zarr.partial" and not out.exists()
    # every block is done: the final job starts no cluster (this scheduler does not exist)
    nowhere = DaskConfig(cluster="address", address="tcp://127.0.0.1:9", worker_timeout=2)
    batched = zarr.open_group(str(run(path, out, dataclasses.replace(cfg, dask=nowhere))),
                              mode="r")
    for name in [threshold_name(t) for t in THRESHOLDS] + ["fragments"]:
        assert np.array_equal(batched[name][:], whole[name][:]), name
    for k in ("u", "v", "level", "pre"):
        assert np.array_equal(batched["graph"][k][:], whole["graph"][k][:])
    assert not (tmp_path / "batched.zarr.partial").exists()
    assert not list(tmp_path.glob(".*.lock"))  # lock files removed by their last holder


def test_infer_in_batches_equals_one_job(tmp_path, infer_setup, caplog):
    from distributed import Client, LocalCluster

    cfg = InferConfig(block=(8, 48, 48), window=(16, 32, 32), overlap=(8, 16, 16),
                      batch_blocks=3)  # 8 blocks: batches of 3, 3, 2
    vol, model = infer_setup / "v.zarr", infer_setup / "model.pt"
    with Client(LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                             dashboard_address=None)) as client:
        one = inference.run(vol, model, tmp_path / "one.zarr", cfg, client=client)
        out = tmp_path / "b.zarr"
        for b in range(2):  # the last batch is left to the final job, as after a lost job
            inference.run(vol, model, out, cfg, client=client, batch=b)
        done = list((tmp_path / "b.zarr.partial" / ".done" / "owned").iterdir())
        assert len(done) == 6 and not out.exists()
        # where the work runs is not part of the staging digest: the batches' blocks are kept
        caplog.set_level("INFO", logger="tokenunify.inference")
        batched = inference.run(vol, model, out, dataclasses.replace(cfg, workers=2),
                                client=client)
        assert "(all blocks): 2 of 8 blocks to predict" in caplog.text
    a = zarr.open_group(str(one))["affinities"][:]
    b = zarr.open_group(str(batched))["affinities"][:]
    assert np.array_equal(a, b)


def test_hierarchy_levels_in_batches_equal_one_job(tmp_path):
    """agglomerate.hierarchy in batch jobs as the workflow runs them (fragments, edges, then
    level0, level1, level2 going up and down2, down1 going down, in batches of nodes, the merge
    that only checks them, relabel), with the default stitching: the same segmentation and merge
    graph as one job."""
    from tokenunify.data.synthetic import generate

    labels = generate((32, 128, 128), seed=3)["labels"]
    path, _ = write_affinities(tmp_path / "affinities.zarr", noisy_affinities(labels))
    cfg = AgglomerateConfig(block=(8, 32, 64), tile=32, context=16, thresholds=THRESHOLDS,
                            batch_blocks=3, hierarchy=[2, 2, 2])
    whole = zarr.open_group(str(run(path, tmp_path / "one.zarr", cfg)), mode="r")
    out = tmp_path / "batched.zarr"
    # 4 x 4 x 2 blocks: level0 32 nodes (11 batches), level1 2 x 2 x 1 (2 batches), level2 the
    # root; the ids go down from the root (down2, 1 node) to level 1's 4 nodes (down1, 2 batches)
    plan = [("fragments", range(11)), ("edges", range(11)), ("level0", range(11)),
            ("level1", range(2)), ("level2", range(1)), ("down2", range(1)),
            ("down1", range(2)), ("merge", [None]), ("relabel", range(11))]
    done = out.with_name(out.name + ".partial") / ".work" / ".done"
    for phase, batches in plan:
        for b in batches:
            run(path, out, cfg, phase=phase, batch=b)
        if phase == "down1":
            assert len(list((done / "down2").iterdir())) == 1  # the root, for level 1's ids
            assert len(list((done / "down1").iterdir())) == 4
    assert [len(list((done / f"level{k}").iterdir())) for k in range(3)] == [32, 4, 1]
    batched = zarr.open_group(str(run(path, out, cfg)), mode="r")
    for name in [threshold_name(t) for t in THRESHOLDS] + ["fragments"] + [
            f"graph/{k}" for k in ("u", "v", "level", "pre")]:
        assert np.array_equal(batched[name][:], whole[name][:]), name
    with pytest.raises(ValueError, match="levels 0..2"):
        run(path, tmp_path / "x.zarr", cfg, phase="level3", batch=0)
    with pytest.raises(ValueError, match="down levels 2..1"):
        run(path, tmp_path / "x.zarr", cfg, phase="down3", batch=0)
    with pytest.raises(ValueError, match="needs agglomerate.hierarchy"):
        run(path, tmp_path / "y.zarr", dataclasses.replace(cfg, hierarchy=None), phase="level0")
