"""The Snakemake workflow end to end on tiny data, lint, and bad configs stopped before any job.

Runs the real `snakemake` command line in a scratch directory, the way users run it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from conftest import REPO

pytestmark = pytest.mark.workflow
SNAKEFILE = REPO / "workflow" / "Snakefile"
TEST_DIR = REPO / ".test"


def tiny_config(workdir: Path) -> dict:
    """The workflow's test configuration, .test/config/config.yaml (the Snakemake template's
    convention), with its data copied into ``workdir``; returned as a dict to vary."""
    shutil.copytree(TEST_DIR / "data", workdir / "data", dirs_exist_ok=True)
    return yaml.safe_load((TEST_DIR / "config" / "config.yaml").read_text())


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
           str(workdir), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def write_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))


def snapshot(results: Path) -> dict[str, str]:
    """Hash of every file under results/ (to prove a failed run changed nothing)."""
    return {str(p.relative_to(results)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(results.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf")
    cfg = tiny_config(workdir)
    write_config(workdir, cfg)
    proc = snakemake(workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, cfg


def test_workflow_produces_data_and_tokens_for_every_dataset(finished_run):
    workdir, cfg = finished_run
    for name in cfg["datasets"]:
        g = zarr.open_group(str(workdir / "results" / "data" / f"{name}.zarr"), mode="r")
        assert g["raw"].dtype == np.uint8
        assert g["raw"].attrs["voxel_size"] == [40.0, 8.0, 8.0]
        tokens = zarr.open_group(str(workdir / "results" / "tokens" / f"{name}.zarr"), mode="r")
        assert tokens["crops"].shape[1:] == (16, 32, 32)
        assert (workdir / "results" / "tokens" / f"{name}.manifest.parquet").exists()
        assert (workdir / "logs" / "download" / f"{name}.log").exists()
        assert (workdir / "results" / "benchmarks" / "tokenize" / f"{name}.tsv").exists()
    assert "labels" in zarr.open_group(str(workdir / "results/data/lab.zarr"), mode="r")
    for exp in ("tokenunify", "none"):
        model_dir = workdir / "results" / "models" / exp / "pretrain"
        assert (model_dir / "checkpoint.pt").exists() and (model_dir / "loss.png").exists()
    lines = (workdir / "results/models/tokenunify/pretrain/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (workdir / "results/models/none/pretrain/metrics.jsonl").read_text() == ""
    for exp in ("tokenunify", "none"):
        ft = workdir / "results" / "models" / exp / "finetune"
        assert (ft / "checkpoint.pt").exists() and (ft / "load_report.json").exists()
        assert any("val_voi" in ln for ln in (ft / "metrics.jsonl").read_text().splitlines())
        aff = zarr.open_group(str(workdir / "results" / exp / "lab" / "affinities.zarr"),
                              mode="r")["affinities"]
        assert aff.shape == (3, 16, 64, 64) and aff.dtype == np.uint8
        assert aff.attrs["voxel_size"] == [40.0, 8.0, 8.0] and aff.attrs["scale"] == 255.0
        assert aff.chunks == (3, 16, 32, 64)
    for exp in ("tokenunify", "none"):
        seg = zarr.open_group(str(workdir / "results" / exp / "lab" / "segmentation.zarr"),
                              mode="r")
        assert seg.attrs["thresholds"] == [0.3, 0.5, 0.7]
        for name in ("threshold_0.300", "threshold_0.500", "threshold_0.700", "fragments"):
            assert seg[name].shape == (16, 64, 64) and seg[name].dtype == np.uint64
        rows = pd.read_csv(workdir / "results" / exp / "lab" / "metrics.csv")
        assert list(rows["threshold"]) == [0.3, 0.5, 0.7]
        assert set(rows["experiment"]) == {exp} and set(rows["dataset"]) == {"lab"}
        assert rows[["voi_split", "voi_merge", "voi", "arand"]].notna().all().all()
        assert np.allclose(rows["voi"], rows["voi_split"] + rows["voi_merge"])
        # the expected run length along the skeletons traced once from lab's labels
        assert rows[["erl_nm", "max_erl_nm", "nerl"]].notna().all().all()
        assert rows["nerl"].between(0, 1).all() and set(rows["erl_merge_rule"]) == {"segment"}
    assert (workdir / "results" / "data" / "lab.skeletons.npz").is_file()
    page = (workdir / "results" / "report" / "index.html").read_text()
    for word in ("tokenunify", "none", "lab", "data:image/png;base64,"):
        assert word in page
    # the validate dataset is segmented and scored too; it chooses the headline threshold
    for exp in ("tokenunify", "none"):
        val = pd.read_csv(workdir / "results" / exp / "h5" / "metrics.csv")
        assert list(val["threshold"]) == [0.3, 0.5, 0.7]
    assert "Thresholds chosen on the validate datasets (h5; minimum mean VOI)" in page
    assert (workdir / "results" / "benchmarks" / "agglomerate" / "none" / "lab.tsv").exists()
    # the blockwise stages ran as batch jobs; their done markers (temp) and staging are gone
    logs = workdir / "logs"
    for exp in ("tokenunify", "none"):
        assert sorted(p.name for p in (logs / "infer" / exp).glob("lab.batch*.log")) == \
            ["lab.batch0.log", "lab.batch1.log"]
        names = {p.name for p in (logs / "agglomerate" / exp).glob("lab.*.log")}
        assert names == {f"lab.{ph}{b}.log" for ph in ("fragments", "edges", "relabel")
                         for b in (0, 1)} | {"lab.merge.log", "lab.fragments.log", "lab.edges.log"}
        for d in ("affinities", "segmentation"):
            assert not list((workdir / "results" / exp / "lab").glob(f"{d}.batches/*"))
            assert not (workdir / "results" / exp / "lab" / f"{d}.zarr.partial").exists()
    # A second run has nothing to do.
    proc = snakemake(workdir, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.timeout(1800)
def test_results_in_an_s3_bucket_equal_the_local_ones(finished_run, tmp_path, monkeypatch):
    """The tiny workflow with its HDF5 dataset and every result in an S3 bucket (moto's server
    on 127.0.0.1, through Snakemake's S3 storage plugin): the metrics.csv in the bucket are
    byte for byte those of the run on disk, and no staging folder or done marker reaches it.
    To keep the suite short the bucket run has the experiment 'none' only: its results do not
    depend on the other experiment's."""
    moto_server = pytest.importorskip("moto.server", reason="moto (dev extra) not installed")
    pytest.importorskip("snakemake_storage_plugin_s3", reason="S3 storage plugin not installed")
    import socket

    import boto3

    local, good = finished_run
    cfg = yaml.safe_load(yaml.safe_dump(good))  # the fixture's config is shared: a copy
    cfg["experiments"] = {"none": cfg["experiments"]["none"]}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"
                     }.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.session.Session().client("s3")
        s3.create_bucket(Bucket="tokenunify-run")
        s3.upload_file(str(TEST_DIR / "data" / "vol.h5"), "tokenunify-run", "sources/vol.h5")
        for part in ("raw", "labels"):
            cfg["datasets"]["h5"][part]["source"] = "s3://tokenunify-run/sources/vol.h5"
        write_config(tmp_path, cfg)
        proc = snakemake(tmp_path, "--default-storage-provider", "s3",
                         "--default-storage-prefix", "s3://tokenunify-run/run",
                         "--storage-s3-endpoint-url", endpoint)
        assert proc.returncode == 0, proc.stderr[-4000:]
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket="tokenunify-run", Prefix="run/") for o in page.get("Contents", [])]
        for ds in ("lab", "h5"):
            key = f"run/results/none/{ds}/metrics.csv"
            body = s3.get_object(Bucket="tokenunify-run", Key=key)["Body"].read()
            assert body == (local / "results" / "none" / ds / "metrics.csv").read_bytes(), key
        assert "run/results/report/index.html" in keys
        assert not [k for k in keys if ".partial/" in k or k.endswith(".done")]
        assert not (tmp_path / "results").exists()  # nothing written beside the bucket
    finally:
        server.stop()


@pytest.mark.timeout(1800)
def test_results_in_a_gcs_bucket_equal_the_local_ones(finished_run, tmp_path, monkeypatch):
    """The same with Google Cloud Storage (gcp-storage-emulator on 127.0.0.1, reached through
    STORAGE_EMULATOR_HOST by our fetch and by Snakemake's GCS storage plugin), experiment none:
    the bucket's metrics.csv are those of the run on disk, and no staging folder or done marker
    reaches the bucket."""
    emulator = pytest.importorskip("gcp_storage_emulator.server",
                                   reason="gcp-storage-emulator (dev extra) not installed")
    pytest.importorskip("snakemake_storage_plugin_gcs", reason="GCS storage plugin not installed")
    import socket

    from google.cloud import storage

    local, good = finished_run
    cfg = yaml.safe_load(yaml.safe_dump(good))
    cfg["experiments"] = {"none": cfg["experiments"]["none"]}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        bucket = storage.Client().create_bucket("tokenunify-run")
        bucket.blob("sources/vol.h5").upload_from_filename(str(TEST_DIR / "data" / "vol.h5"))
        for part in ("raw", "labels"):
            cfg["datasets"]["h5"][part]["source"] = "gs://tokenunify-run/sources/vol.h5"
        write_config(tmp_path, cfg)
        proc = snakemake(tmp_path, "--default-storage-provider", "gcs",
                         "--default-storage-prefix", "gs://tokenunify-run/run",
                         "--storage-gcs-project", "tokenunify-test")
        assert proc.returncode == 0, proc.stderr[-4000:]
        keys = [b.name for b in storage.Client().list_blobs("tokenunify-run", prefix="run/")]
        for ds in ("lab", "h5"):
            key = f"run/results/none/{ds}/metrics.csv"
            assert bucket.blob(key).download_as_bytes() == \
                (local / "results" / "none" / ds / "metrics.csv").read_bytes(), key
        assert "run/results/report/index.html" in keys
        assert not [k for k in keys if ".partial/" in k or k.endswith(".done")]
        assert not (tmp_path / "results").exists()
    finally:
        server.stop()


def _bad_typo(cfg, wd):
    cfg["datasets"]["pre"]["rols"] = cfg["datasets"]["pre"].pop("roles")
    return "unknown key 'rols' (did you mean 'roles'?)"


def _bad_role(cfg, wd):
    cfg["datasets"]["pre"]["roles"] = ["pretrian"]
    return "datasets.pre.roles[0]: 'pretrian' is not one of"


def _bad_missing_file(cfg, wd):
    cfg["datasets"]["h5"]["raw"]["source"] = "nowhere/vol.h5"
    return "datasets.h5.raw.source: file not found: nowhere/vol.h5"


def _bad_h5_key(cfg, wd):
    cfg["datasets"]["h5"]["raw"]["key"] = "volumes/raw"
    return "datasets.h5.raw.key: no dataset 'volumes/raw'"


def _bad_shapes(cfg, wd):
    with h5py.File(wd / "other.h5", "w") as f:
        f["labels"] = np.ones((16, 64, 65), np.uint32)
    cfg["datasets"]["h5"]["labels"] = {"source": "other.h5", "key": "labels"}
    return "raw shape [16, 64, 64] (z, y, x) from data/vol.h5 and labels shape [16, 64, 65]"


@pytest.mark.parametrize("breaker", [_bad_typo, _bad_role, _bad_missing_file, _bad_h5_key,
                                     _bad_shapes], ids=lambda f: f.__name__[5:])
def test_bad_config_stops_before_any_job_and_loses_nothing(finished_run, breaker):
    workdir, good = finished_run
    before = snapshot(workdir / "results")
    cfg = yaml.safe_load(yaml.safe_dump(good))
    message = breaker(cfg, workdir)
    write_config(workdir, cfg)
    try:
        proc = snakemake(workdir, "--forceall")
    finally:
        write_config(workdir, good)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out, out[-3000:]
    assert "Building DAG of jobs" not in out  # stopped while parsing, before any job
    assert snapshot(workdir / "results") == before


def test_lint_is_clean():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr


def test_job_count_of_a_volume_of_100_000_blocks_is_bounded(tmp_path):
    """A declared 3200 x 10240 x 6400 volume is 100 000 blocks of 32 x 256 x 256. With
    batch_blocks 1000 each blockwise phase makes 100 jobs: hundreds of jobs in all, not 10^5."""
    g = zarr.open_group(str(tmp_path / "big.zarr"), mode="w")
    for name, dtype in (("raw", "uint8"), ("labels", "uint64")):
        g.create_array(name, shape=(3200, 10240, 6400), chunks=(64, 512, 512), dtype=dtype)
    g["labels"][:1, :1, :1] = 1  # check_config reads the test labels up to a non-zero block
    cfg = {"datasets": {"big": {"raw": {"source": "big.zarr", "key": "raw"},
                                "labels": {"source": "big.zarr", "key": "labels"},
                                "voxel_size": [40, 8, 8], "roles": ["pretrain", "train", "test"]}},
           "experiments": {"tokenunify": {"pretraining": "tokenunify"},
                           "none": {"pretraining": "none"}},
           "infer": {"block": [32, 256, 256], "batch_blocks": 1000},
           "agglomerate": {"block": [32, 256, 256], "batch_blocks": 1000}}
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    counts = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M)}
    # one local barrier per phase that the next phase waits on (fragments, edges)
    per_exp = {"infer_batch": 100, "infer": 1, "agglomerate_phase": 300, "agglomerate_barrier": 2,
               "agglomerate_merge": 1, "agglomerate": 1, "evaluate": 1, "export": 1}
    for rule, n in per_exp.items():
        assert counts[rule] == 2 * n, (rule, counts)
    # download, tokenize, skeletonize, report, all + per experiment: pretrain, finetune and
    # the above
    assert counts["total"] == 5 + 2 * (2 + sum(per_exp.values())) == 823


def test_job_count_with_a_hierarchy_has_every_level_up_and_down(tmp_path):
    """The same 100 000-block volume with agglomerate.hierarchy [2, 2, 2]: besides the three
    blockwise phases, one job per batch of up to 1000 nodes for every level going up (level0 to
    level7: node grids 100x40x25, 50x20x13, 25x10x7, 13x5x4, 7x3x2, 4x2x1, 2x1x1, 1x1x1 ->
    100, 13, 2, 1, 1, 1, 1, 1 batches) and going down (down7 to down1: 20 batches), and a
    barrier per phase; the merge waits on down1."""
    g = zarr.open_group(str(tmp_path / "big.zarr"), mode="w")
    for name, dtype in (("raw", "uint8"), ("labels", "uint64")):
        g.create_array(name, shape=(3200, 10240, 6400), chunks=(64, 512, 512), dtype=dtype)
    g["labels"][:1, :1, :1] = 1
    cfg = {"datasets": {"big": {"raw": {"source": "big.zarr", "key": "raw"},
                                "labels": {"source": "big.zarr", "key": "labels"},
                                "voxel_size": [40, 8, 8], "roles": ["pretrain", "train", "test"]}},
           "experiments": {"tokenunify": {"pretraining": "tokenunify"}},
           "infer": {"block": [32, 256, 256], "batch_blocks": 1000},
           "agglomerate": {"block": [32, 256, 256], "batch_blocks": 1000,
                           "hierarchy": [2, 2, 2]}}
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, "-n", "-p")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    counts = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M)}
    assert counts["agglomerate_phase"] == 300 + 120 + 20, counts
    assert counts["agglomerate_barrier"] == 2 + 8 + 7, counts
    phases = re.findall(r"--phase (\w+) --batch (\d+)", out)
    per_phase = {}
    for phase, _ in phases:
        per_phase[phase] = per_phase.get(phase, 0) + 1
    assert {k: v for k, v in per_phase.items() if k.startswith("down")} == {
        "down1": 13, "down2": 2, "down3": 1, "down4": 1, "down5": 1, "down6": 1, "down7": 1}


def test_seeded_ablation_through_the_workflow(tmp_path):
    """The ablation's shape on tiny data: 2 experiments x 2 seeds. The runs carry the seed in
    their paths and train with it; the report's mean ± sd and paired comparison equal the
    numbers recomputed from the per-seed metrics.csv files."""
    from scipy import stats

    syn = "synthetic://em?shape=16,64,64&seed={seed}"
    cfg = {
        "datasets": {
            "tr": {"raw": {"source": syn.format(seed=1), "key": "raw"},
                   "labels": {"source": syn.format(seed=1), "key": "labels"},
                   "roles": ["pretrain", "train"]},
            "te": {"raw": {"source": syn.format(seed=2), "key": "raw"},
                   "labels": {"source": syn.format(seed=2), "key": "labels"}, "roles": ["test"]},
        },
        "experiments": {"tokenunify": {"pretraining": "tokenunify"},
                        "none": {"pretraining": "none"}},
        "seeds": [0, 1],
        "report": {"baselines": ["none"], "fixed_threshold": 0.5},
        "download": {"block": [16, 64, 64]},
        "tokenize": {"crop": [16, 32, 32], "patch": [4, 16, 16]},
        "pretrain": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2},
        "finetune": {"crop": [16, 32, 32], "steps": 2, "batch_size": 2, "warmup_steps": 1,
                     "validate_every": 2},
        "infer": {"block": [16, 64, 64], "window": [16, 32, 32], "overlap": [8, 16, 16]},
        "agglomerate": {"block": [16, 64, 64], "tile": 32, "context": 8,
                        "thresholds": [0.3, 0.5, 0.7]},
    }
    write_config(tmp_path, cfg)
    proc = snakemake(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = tmp_path / "results"
    voi = {}
    for exp in ("tokenunify", "none"):
        for seed in (0, 1):
            run = f"{exp}-seed{seed}"
            ckpt = torch_load(results / "models" / run / "finetune" / "checkpoint.pt")
            assert ckpt["config"]["finetune"]["seed"] == seed
            rows = pd.read_csv(results / run / "te" / "metrics.csv").set_index("threshold")
            voi[exp, seed] = rows.loc[0.5, "voi"]  # no validate dataset: the fixed threshold
    page = (results / "report" / "index.html").read_text()
    assert "Experiments over seeds" in page
    for exp in ("tokenunify", "none"):
        v = [voi[exp, 0], voi[exp, 1]]
        assert f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" in page
    d = np.array([voi["tokenunify", s] - voi["none", s] for s in (0, 1)])
    if d.std() > 0:
        lo, hi = stats.t.interval(0.95, 1, loc=d.mean(), scale=stats.sem(d))
        assert f"interval of the VOI difference {lo:+.3f} to {hi:+.3f} bits" in page
    assert "tokenunify" in page and "against none" in page


def torch_load(path):
    from tokenunify.model import checkpoint

    return checkpoint.load(path)
