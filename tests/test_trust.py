"""Results that stay right under faults: a staging folder is resumed only when it was built
from the same settings and the same inputs (content identities chained from download on), and
two processes never write one output at once.

The three stale-resume cases are the probes that gave silently wrong results: the test volume,
the pretraining and the tokens change under a killed stage, at the same paths.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from tokenunify import download, inference, tokenize
from tokenunify.cli import main
from tokenunify.config import TokenizeConfig, validate_config
from tokenunify.io.datasets import DatasetSpec
from tokenunify.io.identity import IDENTITY_FILE, Lineage, identity_of
from tokenunify.io.locks import OutputBusy, hold_output, lock_file
from tokenunify.model import checkpoint as ckpt
from tokenunify.objectives import ObjectiveConfig
from tokenunify.train import finetune, pretrain


def synthetic(name: str, seed: int, shape=(16, 96, 96)) -> DatasetSpec:
    src = f"synthetic://em?shape={','.join(map(str, shape))}&seed={seed}"
    d = validate_config({"datasets": {name: {"raw": {"source": src, "key": "raw"},
                                             "labels": {"source": src, "key": "labels"},
                                             "roles": ["train"]}}})
    return DatasetSpec.from_dict(name, d["datasets"][name])


def stale_logged(caplog, what: str) -> bool:
    return any("discarding stale staging folder" in r.getMessage() and what in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------- identities


def test_identity_chains_through_inputs_and_replaced_files(tmp_path):
    (tmp_path / "user.h5").write_bytes(b"a")
    first = identity_of(tmp_path / "user.h5")
    time.sleep(0.01)
    (tmp_path / "user.h5").write_bytes(b"bb")  # replaced at the same path
    assert identity_of(tmp_path / "user.h5") != first
    up = tmp_path / "up"
    up.mkdir()
    Lineage.of("download", {"seed": 3}).write(up)
    down = Lineage.of("tokenize", {"crop": 16}, {"volume": up})
    assert down.inputs["volume"] == Lineage.of("download", {"seed": 3}).identity
    Lineage.of("download", {"seed": 5}).write(up)  # upstream rebuilt with other settings
    again = Lineage.of("tokenize", {"crop": 16}, {"volume": up})
    assert again.identity != down.identity and again.differences(down) == ["input 'volume' changed"]
    # a file inside an output folder has the folder's identity (checkpoint.pt)
    (up / "checkpoint.pt").write_bytes(b"x")
    assert identity_of(up / "checkpoint.pt") == identity_of(up)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        identity_of(tmp_path / "nowhere")


def test_infer_discards_blocks_predicted_from_the_old_volume(infer_setup, tmp_path, caplog):
    """Probe: infer killed after some blocks; the test volume's seed changes 3 -> 5 at the same
    path; download reruns; infer must not resume the old volume's blocks."""
    from distributed import Client, LocalCluster

    vol, model = tmp_path / "test.zarr", infer_setup / "model.pt"
    download.run(synthetic("test", 3), vol, progress=False)
    cfg = inference.InferConfig(block=(8, 48, 48), window=(16, 32, 32), overlap=(8, 16, 16),
                                batch_blocks=4)
    caplog.set_level(logging.INFO)
    with Client(LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                             dashboard_address=None)) as client:
        inference.run(vol, model, tmp_path / "aff.zarr", cfg, client=client, batch=0)  # "killed"
        assert len(list((tmp_path / "aff.zarr.partial/.done/owned").iterdir())) == 4
        download.run(synthetic("test", 5), vol, progress=False)  # the config changed
        out = inference.run(vol, model, tmp_path / "aff.zarr", cfg, client=client)
        ref = inference.run(vol, model, tmp_path / "clean.zarr", cfg, client=client)
    assert stale_logged(caplog, "input 'volume' changed")
    assert any("8 of 8 blocks to predict" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(zarr.open_group(str(out))["affinities"][:],
                                  zarr.open_group(str(ref))["affinities"][:])
    rec = Lineage.read(out)
    assert rec is not None and rec.inputs["volume"] == identity_of(vol)
    assert zarr.open_group(str(out))["affinities"].attrs["provenance"]["identity"] == rec.identity


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tiny_em):
    d = tmp_path_factory.mktemp("trust")
    download.run(synthetic("v", 7), d / "v.zarr", progress=False)
    return d


PRE = pretrain.PretrainConfig(steps=6, batch_size=2, warmup_steps=1, checkpoint_every=3,
                              objective=ObjectiveConfig(resampler_dim=32, resampler_layers=1))
TOK = TokenizeConfig(crop=(16, 32, 32), patch=(4, 16, 16), scheduler="synchronous")


def test_pretrain_discards_a_checkpoint_trained_on_old_tokens(tokens, tmp_path, caplog):
    """Probe: pretraining killed after last.pt; tokenize.normalize changes to per_volume at the
    same token path; pretraining must restart, not resume on weights from the old tokens."""
    tok = tmp_path / "t.zarr"
    tokenize.run(tokens / "v.zarr", tok, tmp_path / "t.parquet", TOK)
    assert pretrain.run([tok], tmp_path / "pre", "tu", "tokenunify", PRE, progress=False,
                        stop_after=3) is None
    tokenize.run(tokens / "v.zarr", tok, tmp_path / "t.parquet",
                 dataclasses.replace(TOK, normalize="per_volume"))
    caplog.set_level(logging.INFO)
    out = pretrain.run([tok], tmp_path / "pre", "tu", "tokenunify", PRE, progress=False)
    assert stale_logged(caplog, "input 'tokens' changed")
    assert not any("resuming pretraining" in r.getMessage() for r in caplog.records)
    clean = pretrain.run([tok], tmp_path / "clean", "tu", "tokenunify", PRE, progress=False)
    a, b = ckpt.load(out / "checkpoint.pt")["model"], ckpt.load(clean / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_finetune_discards_a_run_started_from_the_old_pretraining(tokens, tmp_path, caplog):
    """Probe: fine-tuning killed after last.pt; pretrain.seed changes and pretraining reruns at
    the same path; fine-tuning must restart from the new pretraining."""
    tok = tmp_path / "t.zarr"
    tokenize.run(tokens / "v.zarr", tok, tmp_path / "t.parquet", TOK)
    pre = tmp_path / "pre"
    pretrain.run([tok], pre, "none", "none", PRE, progress=False)
    cfg = finetune.FinetuneConfig(crop=(16, 32, 32), steps=4, batch_size=2, warmup_steps=1,
                                  checkpoint_every=2)
    train = [tokens / "v.zarr"]
    assert finetune.run(pre / "checkpoint.pt", train, [], tmp_path / "ft", "e", cfg,
                        progress=False, stop_after=2) is None
    pretrain.run([tok], pre, "none", "none", dataclasses.replace(PRE, seed=7), progress=False)
    caplog.set_level(logging.INFO)
    out = finetune.run(pre / "checkpoint.pt", train, [], tmp_path / "ft", "e", cfg,
                       progress=False)
    assert stale_logged(caplog, "input 'pretrained' changed")
    clean = finetune.run(pre / "checkpoint.pt", train, [], tmp_path / "clean", "e", cfg,
                         progress=False)
    a, b = ckpt.load(out / "checkpoint.pt")["model"], ckpt.load(clean / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_unchanged_inputs_still_resume(tokens, tmp_path, caplog):
    tok = tmp_path / "t.zarr"
    tokenize.run(tokens / "v.zarr", tok, tmp_path / "t.parquet", TOK)
    pretrain.run([tok], tmp_path / "pre", "tu", "tokenunify", PRE, progress=False, stop_after=3)
    caplog.set_level(logging.INFO)
    out = pretrain.run([tok], tmp_path / "pre", "tu", "tokenunify", PRE, progress=False)
    assert any("resuming pretraining at step 3" in r.getMessage() for r in caplog.records)
    assert (out / IDENTITY_FILE).exists()


# --------------------------------------------------------------------------- locks


def test_output_lock_excludes_a_second_writer_and_names_the_holder(tmp_path):
    out = tmp_path / "segmentation.zarr"
    with hold_output(out):
        with pytest.raises(OutputBusy, match=r"segmentation.zarr is being written .* pid \d+ "):
            with hold_output(out):
                pass
        with pytest.raises(OutputBusy):
            with hold_output(out, "relabel0"):
                pass
    # batch jobs share the output, not their batch; the whole run waits for them
    with hold_output(out, "edges0"), hold_output(out, "edges1"):
        with pytest.raises(OutputBusy, match=r"\(edges1\)"):
            with hold_output(out, "edges1"):
                pass
        with pytest.raises(OutputBusy):
            with hold_output(out):
                pass
    assert not list(tmp_path.glob(".*.lock"))  # the last holder removes the lock files
    with hold_output(out):
        assert lock_file(out).exists()


def test_two_agglomerate_processes_on_one_output(tmp_path):
    """Probe: two `tokenunify agglomerate` started together on one --out both exited 0 and the
    output lost its threshold arrays. Now one fails at once and names the other."""
    from tokenunify.agglomerate import threshold_name
    from tokenunify.data.synthetic import generate
    from tokenunify.evaluate import run as evaluate

    em = generate((16, 128, 128), seed=3)
    vol = zarr.open_group(str(tmp_path / "vol.zarr"), mode="w")
    from tokenunify.affinities import seg_to_affinities, widen_borders
    from tokenunify.io.zarrio import create_volume

    create_volume(vol, "labels", em["labels"].shape, (16, 128, 128), np.uint64, (40, 8, 8),
                  (0, 0, 0))[:] = em["labels"]
    aff = seg_to_affinities(widen_borders(em["labels"]))
    g = zarr.open_group(str(tmp_path / "affinities.zarr"), mode="w")
    create_volume(g, "affinities", aff.shape[1:], (16, 128, 128), np.float32, (40, 8, 8),
                  (0, 0, 0), channels=3)[:] = aff
    spec = ('{"agglomerate": {"block": [8, 64, 64], "tile": 64, "context": 16, '
            '"thresholds": [0.3, 0.5, 0.7]}}')
    cmd = [sys.executable, "-m", "tokenunify.cli", "agglomerate", str(tmp_path / "affinities.zarr"),
           "--out", str(tmp_path / "seg.zarr"), "--spec", spec, "--workers", "1"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "seg.zarr is being written by another process: pid" in loser
    df = evaluate(tmp_path / "seg.zarr", tmp_path / "vol.zarr", tmp_path / "m.csv", "e", "d")
    assert len(df) == 3 and df["voi"].notna().all()
    # evaluate names a missing threshold array instead of a raw KeyError
    import shutil

    shutil.rmtree(tmp_path / "seg.zarr" / threshold_name(0.5))
    with pytest.raises(ValueError, match=r"threshold array 'threshold_0.500'.* missing"):
        evaluate(tmp_path / "seg.zarr", tmp_path / "vol.zarr", tmp_path / "m.csv", "e", "d")


def test_cli_reports_a_busy_output_and_a_full_disk(tmp_path, monkeypatch, caplog):
    import errno

    out = tmp_path / "metrics.csv"
    args = ["evaluate", str(tmp_path / "seg.zarr"), "--volume", str(tmp_path / "v.zarr"),
            "--out", str(out), "--experiment", "e", "--dataset", "d"]
    with hold_output(out):
        assert main(args) == 2
    assert "metrics.csv is being written by another process" in caplog.text

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tokenunify.evaluate.run", full)
    caplog.clear()
    assert main(args) == 2
    assert f"no space left on device while writing {out}" in caplog.text
