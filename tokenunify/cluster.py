"""Where the blockwise stages run their Dask tasks, and how their blocks split into batches.

``dask`` settings (config sections ``infer.dask`` and ``agglomerate.dask``)::

    cluster: local     # the stage's own scheduler inside its job (default)
    cluster: address   # an existing Dask scheduler: address: tcp://host:8786
    cluster: slurm     # a dask-jobqueue SLURMCluster started for the stage: worker jobs with
                       # cores / memory / walltime / job_extra_directives (e.g. --gpus=1),
                       # scaled to min(max_jobs, blocks), shut down when the stage ends or fails

Batches (``batch_blocks``): the workflow splits a blockwise stage into one Snakemake job per
batch of ``batch_blocks`` consecutive blocks (in the order of
:func:`tokenunify.io.zarrio.blocks`), so that a volume of 10^5 blocks makes hundreds of jobs,
not 10^5, and not one job that holds them all. A batch is only a unit of work: the stage's final
job completes whatever blocks are still missing, so a wrong batch plan costs time, never
correctness.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from tokenunify.settings import defaults

log = logging.getLogger(__name__)

_DEFAULTS = defaults("infer", "dask")


@dataclass(frozen=True)
class DaskConfig:
    """Dask cluster of a blockwise stage. Memory strings as dask-jobqueue takes them ("8GB")."""

    cluster: str = _DEFAULTS["cluster"]
    address: str | None = _DEFAULTS["address"]  # cluster: address
    max_jobs: int = _DEFAULTS["max_jobs"]  # slurm: worker jobs at most (fewer when there are fewer blocks)
    cores: int = _DEFAULTS["cores"]  # slurm: cores per worker job (threads of its worker)
    processes: int = _DEFAULTS["processes"]  # slurm: worker processes per job
    memory: str = _DEFAULTS["memory"]  # slurm: memory per worker job
    walltime: str = _DEFAULTS["walltime"]  # slurm: time limit of a worker job
    account: str | None = _DEFAULTS["account"]  # slurm: sbatch -A
    queue: str | None = _DEFAULTS["queue"]  # slurm: sbatch -p
    # slurm: more sbatch options, e.g. "--gpus=1"
    job_extra_directives: tuple[str, ...] = _DEFAULTS["job_extra_directives"]
    interface: str | None = _DEFAULTS["interface"]  # network interface of scheduler and workers (e.g. "ib0")
    log_directory: str | None = _DEFAULTS["log_directory"]  # slurm: worker job logs (None: logs/dask-workers)
    worker_timeout: float = _DEFAULTS["worker_timeout"]  # seconds to wait for the first worker

    def __post_init__(self):
        # single values are checked by the schema (tokenunify.settings.from_section)
        if self.cluster == "address" and not self.address:
            raise ValueError("dask.cluster 'address' needs dask.address (tcp://host:port)")


def worker_jobs(cfg: DaskConfig, n_tasks: int) -> int:
    """Worker jobs for ``n_tasks`` block tasks: one process per task at most, max_jobs cap."""
    return max(1, min(cfg.max_jobs, math.ceil(max(n_tasks, 1) / cfg.processes)))


@contextmanager
def _terminate_as_exit():
    """Turn SIGTERM (Slurm's scancel, a time limit) into SystemExit inside the block, so that
    ``finally`` clauses run and the worker jobs are cancelled."""
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def dask_client(cfg: DaskConfig, n_tasks: int, name: str):
    """A ``distributed.Client`` for ``n_tasks`` block tasks of stage ``name``, or None for
    ``cluster: local`` (the stage then uses its own local scheduler). A SLURMCluster started
    here is closed on exit, also when the stage fails or gets SIGTERM."""
    if cfg.cluster == "local":
        yield None
        return
    from distributed import Client

    if cfg.cluster == "address":
        log.info("%s: Dask scheduler at %s", name, cfg.address)
        with Client(cfg.address, timeout=cfg.worker_timeout) as client:
            yield client
        return
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise RuntimeError("dask.cluster 'slurm' needs dask-jobqueue (pip install "
                           "dask-jobqueue)") from exc
    jobs = worker_jobs(cfg, n_tasks)
    with _terminate_as_exit():
        cluster = SLURMCluster(
            cores=cfg.cores, processes=cfg.processes, memory=cfg.memory,
            walltime=cfg.walltime, account=cfg.account, queue=cfg.queue,
            job_extra_directives=list(cfg.job_extra_directives), interface=cfg.interface,
            log_directory=cfg.log_directory or "logs/dask-workers", python=sys.executable,
            job_name=f"dask-{name}",
            scheduler_options={"dashboard_address": ":0"})  # a free port: jobs share nodes
        try:
            log.info("%s: SLURMCluster with %d worker job(s) of %d core(s), %s; job script:\n%s",
                     name, jobs, cfg.cores, cfg.memory, cluster.job_script())
            cluster.scale(jobs=jobs)
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=cfg.worker_timeout)
                yield client
        finally:
            cluster.close()
            log.info("%s: SLURMCluster closed (worker jobs cancelled)", name)


def n_batches(n_blocks: int, batch_blocks: int | None) -> int:
    """Snakemake jobs of a blockwise stage: ceil(blocks / batch_blocks); 1 when unset."""
    if not batch_blocks or n_blocks <= 0:
        return 1
    return math.ceil(n_blocks / batch_blocks)


def hierarchy_phase(phase: str) -> tuple[str, int] | None:
    """(kind, level) of a hierarchy phase name: ``levelK`` (level K going up, K >= 0) or
    ``downK`` (the segment ids going down from level K, K >= 1); None for any other name."""
    kind = phase.rstrip("0123456789")
    if kind in ("level", "down") and kind != phase:
        return kind, int(phase[len(kind):])
    return None


def batch_of(grid: list, batch: int | None, batch_blocks: int | None) -> list:
    """The blocks of batch ``batch`` (consecutive in ``grid``'s order); all for None."""
    if batch is None:
        return grid
    if not batch_blocks:
        raise ValueError("a batch was given but batch_blocks is not set")
    if not 0 <= batch < n_batches(len(grid), batch_blocks):
        # planned from another shape (the source changed): the final job does what is missing
        log.warning("batch %d is past the last batch: %d blocks make %d batches of %d",
                    batch, len(grid), n_batches(len(grid), batch_blocks), batch_blocks)
        return []
    return grid[batch * batch_blocks:(batch + 1) * batch_blocks]


def planned_shape(data_zarr: str, spec) -> tuple[int, ...] | None:
    """(z, y, x) of a downloaded volume, for planning batches before the volume exists: the
    ``raw`` array of ``data_zarr`` once downloaded, else the declared source (bbox applied),
    else None (a remote source not fetched yet)."""
    import os

    import zarr

    from tokenunify.io.datasets import open_dataset

    if os.path.exists(os.path.join(data_zarr, "zarr.json")):
        return tuple(zarr.open_group(data_zarr, mode="r")["raw"].shape)
    raw, _ = open_dataset(spec, fetch=False)
    return None if raw is None else tuple(raw.shape)


def block_count(shape, block) -> int:
    """Blocks of ``block`` (z, y, x) over ``shape`` (last ones clipped)."""
    return math.prod(math.ceil(n / b) for n, b in zip(shape, block, strict=True))
