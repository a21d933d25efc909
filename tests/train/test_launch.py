"""Where training processes go: --nproc locally, the Slurm job's GPUs and nodes under Slurm.

The launch itself is exercised in tests/train/test_pretrain.py (2 local gloo processes) and
tests/test_slurm.py (2 processes inside a Slurm job that got 2 GPUs).
"""

from __future__ import annotations

import pytest

from tokenunify.train import distributed
from tokenunify.train.distributed import LaunchPlan, plan_launch, srun_command


def test_outside_slurm_nproc_decides():
    assert plan_launch(None, 1, env={}) == LaunchPlan(1, 1, "local")
    assert plan_launch(None, 3, env={}) == LaunchPlan(1, 3, "local")
    assert plan_launch(2, 3, env={}) == LaunchPlan(1, 2, "local")
    with pytest.raises(ValueError, match="--nproc"):
        plan_launch(0, 1, env={})


def test_inside_slurm_the_jobs_gpus_and_nodes_decide():
    one = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "4"}
    assert plan_launch(None, 1, env=one) == LaunchPlan(1, 4, "slurm-gpus")
    two = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_GPUS": "0,1"}
    assert plan_launch(None, 1, env=two).world == 4
    # a CPU-only job: the config's nproc per node; --nproc still overrides
    cpu = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3"}
    assert plan_launch(None, 2, env=cpu) == LaunchPlan(3, 2, "slurm-nproc")
    assert plan_launch(1, 2, env=one) == LaunchPlan(1, 1, "local")


def test_multi_node_command_runs_one_torchrun_per_node_with_a_c10d_rendezvous(monkeypatch):
    monkeypatch.setattr(distributed, "_first_node", lambda env: "gpu017")
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    cmd = srun_command(plan_launch(None, 1, env=env), ["pretrain", "tu", "--out", "m"], env=env)
    assert cmd[:5] == ["srun", "--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert "--nnodes=2" in cmd and "--nproc_per_node=8" in cmd
    assert "--rdzv_endpoint=gpu017:29400" in cmd and "--rdzv_id=4242" in cmd
    assert cmd[-6:] == ["-m", "tokenunify.cli", "pretrain", "tu", "--out", "m"]
