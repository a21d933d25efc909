"""torchrun / DDP plumbing: process group from the environment, rank-0 helpers, local launch.

Under ``torchrun`` (or Slurm's srun with the same variables) RANK, WORLD_SIZE and LOCAL_RANK are
set; the backend is NCCL on GPUs and gloo on CPUs. Without them everything runs as one process.
"""

from __future__ import annotations

import logging
import os
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


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


__all__ = ["DistInfo", "setup", "teardown", "barrier", "launch_local", "in_torchrun"]
