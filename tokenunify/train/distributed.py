"""torchrun / DDP plumbing: process group from the environment, rank-0 helpers, launchers.

Under ``torchrun`` RANK, WORLD_SIZE and LOCAL_RANK are set; the backend is NCCL on GPUs and gloo
on CPUs. Without them everything runs as one process.

Launch (:func:`plan_launch`): outside Slurm, ``--nproc`` (or the config's ``nproc``) local
processes. Inside a Slurm job, one process per GPU the job got on each node (``nproc`` when it
got none) over all of the job's nodes: one node runs torchrun ``--standalone``; several nodes run
``srun`` with one torchrun per node, meeting at a c10d rendezvous on the job's first node.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Initialise the process group when launched by torchrun; choose this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d of %d on %s", rank, world, device)
    return DistInfo(rank, world, local, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run ``tokenunify <argv>`` under torchrun with ``nproc`` local processes."""
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "tokenunify.cli", *argv]
    log.info("launching torchrun %s", " ".join(args))
    try:
        torchrun(args)
    except SystemExit as exc:  # torchrun exits through sys.exit on failure
        return int(exc.code or 0)
    return 0


RDZV_PORT = 29400  # c10d rendezvous port on the job's first node (torchrun's default)


@dataclass(frozen=True)
class LaunchPlan:
    """How a training command is (re)started: ``nodes`` x ``per_node`` processes."""

    nodes: int
    per_node: int
    source: str  # why: 'local', 'slurm-gpus' or 'slurm-nproc'

    @property
    def world(self) -> int:
        return self.nodes * self.per_node


def _slurm_gpus_on_node(env) -> int:
    """GPUs Slurm gave this job on this node (0 without GPUs)."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    ids = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    return len([i for i in ids.split(",") if i.strip()])


def plan_launch(nproc: int | None, config_nproc: int, env=None) -> LaunchPlan:
    """Processes to launch. ``nproc``: the ``--nproc`` option (None: not given), which wins
    everywhere; ``config_nproc``: the config's ``nproc``. Inside a Slurm job (SLURM_JOB_ID set)
    the job's node count and GPUs per node decide."""
    env = os.environ if env is None else env
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be >= 1, not {nproc}")
    if "SLURM_JOB_ID" not in env:
        return LaunchPlan(1, nproc or config_nproc, "local")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    gpus = _slurm_gpus_on_node(env)
    if nproc is not None:
        return LaunchPlan(nodes, nproc, "local" if nodes == 1 else "slurm-nproc")
    if gpus:
        return LaunchPlan(nodes, gpus, "slurm-gpus")
    return LaunchPlan(nodes, config_nproc, "slurm-nproc")


def _first_node(env) -> str:
    """The first host of the job's node list (``scontrol show hostnames``)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("multi-node launch: SLURM_JOB_NODELIST is not set")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0]


def srun_command(plan: LaunchPlan, argv: list[str], env=None) -> list[str]:
    """``srun`` running one torchrun per node of the job, with a c10d rendezvous on the first
    node (``--overlap``: the rule already runs in a job step that holds the node's CPUs)."""
    env = os.environ if env is None else env
    host = _first_node(env)
    return ["srun", "--overlap", f"--nodes={plan.nodes}", f"--ntasks={plan.nodes}",
            "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={plan.nodes}", f"--nproc_per_node={plan.per_node}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={host}:{RDZV_PORT}",
            f"--rdzv_id={env.get('SLURM_JOB_ID', 'tokenunify')}",
            "-m", "tokenunify.cli", *argv]


def launch(plan: LaunchPlan, argv: list[str]) -> int:
    """Run ``tokenunify <argv>`` as planned: torchrun in this process for one node, srun over
    the job's nodes for several. Returns the exit code."""
    log.info("launch: %d node(s) x %d process(es) (%s)", plan.nodes, plan.per_node, plan.source)
    if plan.nodes == 1:
        return launch_local(plan.per_node, argv)
    cmd = srun_command(plan, argv)
    log.info("launching %s", shlex.join(cmd))
    return subprocess.run(cmd).returncode


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


__all__ = ["DistInfo", "LaunchPlan", "setup", "teardown", "barrier", "launch", "launch_local",
           "plan_launch", "srun_command", "in_torchrun"]
