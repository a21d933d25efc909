"""Pretraining: loss goes down, resume continues the same curve, DDP equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tokenunify import tokenize
from tokenunify.config import TokenizeConfig
from tokenunify.io.zarrio import create_volume
from tokenunify.model import checkpoint as ckpt
from tokenunify.objectives import ObjectiveConfig
from tokenunify.train.loop import lr_at, param_groups
from tokenunify.train.pretrain import PretrainConfig, run


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tiny_em):
    d = tmp_path_factory.mktemp("tok")
    g = zarr.open_group(str(d / "v.zarr"), mode="w")
    create_volume(g, "raw", (16, 96, 96), (16, 96, 96), np.uint8, (40, 8, 8), (0, 0, 0))[:] = \
        tiny_em["raw"]
    tokenize.run(d / "v.zarr", d / "t.zarr", d / "t.parquet",
                 TokenizeConfig(crop=(16, 32, 32), patch=(4, 16, 16), scheduler="synchronous"))
    return d / "t.zarr"


CFG = PretrainConfig(steps=6, batch_size=2, warmup_steps=1, checkpoint_every=3, lr=2e-3,
                     objective=ObjectiveConfig(resampler_dim=32, resampler_layers=1))


def losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_and_param_groups():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)
    from tokenunify.model.emmamba import EMmamba, preset

    net = EMmamba(preset("tiny"))
    groups = param_groups(net, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    m = net.vit.stages[0][0].mamba
    assert id(m.A_log) in no_decay and id(m.D) in no_decay and id(m.dt_proj.bias) in no_decay
    assert id(m.in_proj.weight) not in no_decay


def test_resume_continues_the_same_curve(tokens, tmp_path):
    full = run([tokens], tmp_path / "full", "tu", "tokenunify", CFG, progress=False)
    assert run([tokens], tmp_path / "cut", "tu", "tokenunify", CFG, progress=False,
               stop_after=3) is None  # "killed" after step 3; last checkpoint at step 2
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "last.pt").exists()
    resumed = run([tokens], tmp_path / "cut", "tu", "tokenunify", CFG, progress=False)
    a, b = losses(full), losses(resumed)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-5)
    sa = ckpt.load(full / "checkpoint.pt")["model"]
    sb = ckpt.load(resumed / "checkpoint.pt")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    assert a[-1] < a[0]  # it learns


def test_none_objective_writes_random_init(tokens, tmp_path):
    out = run([tokens], tmp_path / "none", "none", "none", CFG, progress=False)
    state = ckpt.load(out / "checkpoint.pt")
    assert state["step"] == 0 and state["pretraining"] == "none"
    assert (out / "metrics.jsonl").read_text() == "" and (out / "loss.png").exists()
    # without any pretrain dataset (a config with labelled data only): the same network
    bare = ckpt.load(run([], tmp_path / "bare", "none", "none", CFG, progress=False)
                     / "checkpoint.pt")
    for k, v in state["model"].items():
        assert torch.equal(v, bare["model"][k]), k
    with pytest.raises(ValueError, match="'tokenunify' needs token stores"):
        run([], tmp_path / "tu", "tu", "tokenunify", CFG, progress=False)


def test_ddp_two_gloo_processes_equal_one_process(tokens, tmp_path):
    """torchrun with 2 CPU processes gives the same parameters as 1 process (same global batch)."""
    spec = json.dumps({"experiment": {"pretraining": "tokenunify"},
                       "pretrain": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 2e-3,
                                    "objective": {"resampler_dim": 32, "resampler_layers": 1}}})
    grads = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "TOKENUNIFY_DUMP_GRADS": str(tmp_path / f"grads{nproc}.pt")}
        cmd = [sys.executable, "-m", "tokenunify.cli", "pretrain", "tu", "--tokens", str(tokens),
               "--out", str(out), "--spec", spec, "--nproc", str(nproc)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "checkpoint.pt").exists()
        grads[nproc] = ckpt.load(tmp_path / f"grads{nproc}.pt")
    assert grads[1].keys() == grads[2].keys() and len(grads[1]) > 100
    # Equal up to float32 summation order (batch 1 vs 2 changes conv kernels): each tensor's
    # error relative to the whole gradient's norm (biases feeding an InstanceNorm have a true
    # gradient of 0, so their own norm is pure rounding). Summing instead of averaging over the
    # processes would give errors of order 1.
    total = torch.sqrt(sum(g.norm() ** 2 for g in grads[1].values()))
    worst = max(float((grads[1][k] - grads[2][k]).norm() / total) for k in grads[1])
    assert worst < 1e-3, worst  # observed 2e-4 (1 vs 2 processes), 2e-6 (1 vs 2 threads)
    wrong = max(float((grads[1][k] - 2 * grads[2][k]).norm() / total) for k in grads[1])
    assert wrong > 1e-2  # the comparison can tell a wrong reduction apart
