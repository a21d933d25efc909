"""The workflow through a real one-node Slurm cluster (.ci/slurm/start.sh), as users run it.

Runs only where CI=true or TOKENUNIFY_SLURM_TEST=1 (it installs and starts Slurm daemons, as
root); skipped elsewhere. The cluster is stopped afterwards, also when a test fails.

- The README's two commands run literally, in a copy of the repository holding the tiny config,
  with a fresh HOME. The one change: the copy's profile polls Slurm after 1 s instead of 20 s,
  so that the tiny jobs do not wait.
- Training in a Slurm job that got 2 (stand-in) GPUs starts 2 gloo processes.
- infer and agglomerate on a 2-worker dask-jobqueue SLURMCluster write the local result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent))
from test_workflow import snakemake, tiny_config, write_config  # noqa: E402

pytestmark = [
    pytest.mark.workflow,
    # the module fixture runs the workflow twice (locally and through sbatch): about 8 minutes
    # on a quiet 2-core machine, over 15 when the machine is busy
    pytest.mark.timeout(2700),
    pytest.mark.skipif(os.environ.get("CI") != "true"
                       and os.environ.get("TOKENUNIFY_SLURM_TEST") != "1",
                       reason="starts a real Slurm cluster: only with CI=true or "
                              "TOKENUNIFY_SLURM_TEST=1"),
]
STAGES = {"download", "tokenize", "pretrain", "finetune", "infer_batch", "infer",
          "agglomerate_phase", "agglomerate_merge", "agglomerate", "skeletonize", "evaluate",
          "export", "report"}

# A `tokenunify` first on PATH that fails the report stage once, then runs the real one: the
# injected fault (PATH reaches the jobs through sbatch --export=ALL).
FLAKY = """#!/bin/sh
if [ "$1" = report ] && [ ! -e "{marker}" ]; then
    touch "{marker}"
    echo "injected fault: report fails once" >&2
    exit 3
fi
exec "{real}" "$@"
"""


def readme_slurm_commands() -> list[str]:
    """The shell lines of the README's first code block that runs `--profile slurm`."""
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if "snakemake --profile slurm" in block:
            return [ln for ln in block.splitlines() if ln.strip()]
    raise AssertionError("README.md has no ```bash block with `snakemake --profile slurm`")


def copy_repo(dest: Path) -> None:
    """The repository's tracked files (the working tree's versions) into ``dest``, with
    ``../shared`` beside it when the repository has one."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f, follow_symlinks=False)
    shared = REPO.parent / "shared"
    if shared.exists() and not (dest.parent / "shared").exists():
        (dest.parent / "shared").symlink_to(shared)


def slurm_jobs_gone(prefix: str, timeout: float = 60) -> bool:
    """True once squeue lists no job whose name starts with ``prefix`` (cancelled jobs pass
    through COMPLETING for a moment)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True,
                               check=True).stdout.split()
        if not any(n.startswith(prefix) for n in names):
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ, SLURM_BASE="/tmp/tokenunify-slurm-test")
    try:
        proc = subprocess.run([str(REPO / ".ci/slurm/start.sh")], env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield
    finally:
        subprocess.run([str(REPO / ".ci/slurm/stop.sh")], env=env, timeout=120)


def slurm_config(workdir: Path) -> dict:
    """The workflow test's tiny config without its validate dataset: Slurm adds nothing to
    validate-set scoring (tested locally), and its extra jobs cost minutes through sbatch."""
    cfg = tiny_config(workdir)
    del cfg["datasets"]["h5"]
    return cfg


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """A local run and a run of the README's Slurm commands, in a copy of the repository."""
    tmp = tmp_path_factory.mktemp("slurm")
    local, repo, home = tmp / "local", tmp / "repo", tmp / "home"
    local.mkdir()
    home.mkdir()
    write_config(local, slurm_config(local))
    copy_repo(repo)
    write_config(repo, slurm_config(repo))
    profile = repo / "workflow/profiles/slurm/config.yaml"
    text = profile.read_text()
    assert "slurm-init-seconds-before-status-checks: 20" in text
    profile.write_text(text.replace("slurm-init-seconds-before-status-checks: 20",
                                    "slurm-init-seconds-before-status-checks: 1"))

    proc = snakemake(local)
    assert proc.returncode == 0, proc.stderr[-3000:]

    shim = tmp / "bin"
    shim.mkdir()
    real = Path(sys.executable).parent / "tokenunify"
    (shim / "tokenunify").write_text(FLAKY.format(marker=tmp / "failed_once", real=real))
    (shim / "tokenunify").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    env["PATH"] = f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    script = "set -e\n" + "\n".join(readme_slurm_commands()) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (home / ".config/snakemake/slurm").resolve() == (repo / "workflow/profiles/slurm")
    return local, repo, log, tmp


def test_every_rule_ran_as_a_slurm_job_and_a_failed_job_was_retried(runs):
    _, _, log, tmp = runs
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)", log)
    rules = {re.search(r"rule_([a-z_]+)", path).group(1) for _, path in submitted}
    assert rules == STAGES
    for jobid, path in submitted:  # each job's id names its kept log
        assert Path(path).exists() and Path(path).name == f"{jobid}.log"
    # the injected fault: report failed once in Slurm and was resubmitted
    assert (tmp / "failed_once").exists()
    assert sum("rule_report/" in p for _, p in submitted) == 2


def test_slurm_run_gives_the_local_metrics_and_report(runs):
    local, repo, _, _ = runs
    for exp in ("tokenunify", "none"):
        a = (local / "results" / exp / "lab" / "metrics.csv").read_text()
        b = (repo / "results" / exp / "lab" / "metrics.csv").read_text()
        assert a == b

    def content(path):  # all but the generation time and the run-time section
        html = path.read_text().split('<h2 id="runtimes">')[0]
        return re.sub(r"Generated [^<]*", "", html)

    page = content(repo / "results/report/index.html")
    assert page == content(local / "results/report/index.html")
    assert all(w in page for w in ("tokenunify", "none", "lab"))


def test_training_in_a_slurm_job_with_2_gpus_starts_2_processes(runs, tmp_path):
    _, repo, _, _ = runs
    spec = ('{"experiment": {"pretraining": "tokenunify"}, "pretrain": {"steps": 2, '
            '"batch_size": 2, "warmup_steps": 1}}')
    cmd = ["srun", "--gpus=2", "--cpus-per-task=2", "--mem=6000", "--time=20",
           str(Path(sys.executable).parent / "tokenunify"), "pretrain", "tu",
           "--tokens", str(repo / "results/tokens/pre.zarr"), "--out", str(tmp_path / "ddp"),
           "--spec", spec]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "launch: 1 node(s) x 2 process(es) (slurm-gpus)" in log
    assert "rank 1 of 2 on cpu" in log and "rank 0 of 2 on cpu" in log
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()


def test_blockwise_stages_on_a_slurm_dask_cluster_equal_the_local_run(runs, tmp_path):
    from tokenunify import inference
    from tokenunify.agglomerate import AgglomerateConfig, run
    from tokenunify.cluster import DaskConfig, dask_client
    from tokenunify.config import validate_config

    _, repo, _, _ = runs
    cfg = validate_config(tiny_config(tmp_path))
    dask = DaskConfig(cluster="slurm", max_jobs=2, cores=1, memory="3GB", walltime="00:20:00",
                      log_directory=str(tmp_path / "dask-logs"), worker_timeout=300)
    res = repo / "results" / "none" / "lab"
    infer_cfg = inference.InferConfig(**{
        **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["infer"].items()},
        "dask": dask, "batch_blocks": None})
    out = inference.run(repo / "results/data/lab.zarr",
                        repo / "results/models/none/finetune/checkpoint.pt",
                        tmp_path / "affinities.zarr", infer_cfg)
    a = zarr.open_group(str(out), mode="r")["affinities"][:]
    assert np.array_equal(a, zarr.open_group(str(res / "affinities.zarr"), mode="r")
                          ["affinities"][:])

    agg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["agglomerate"].items()}
    seg = zarr.open_group(str(run(res / "affinities.zarr", tmp_path / "segmentation.zarr",
                                  AgglomerateConfig(**{**agg, "dask": dask,
                                                       "batch_blocks": None}))), mode="r")
    want = zarr.open_group(str(res / "segmentation.zarr"), mode="r")
    for name in ("threshold_0.300", "threshold_0.500", "threshold_0.700", "fragments"):
        assert np.array_equal(seg[name][:], want[name][:]), name
    # the work ran in Slurm worker jobs, and they are gone
    assert len(list((tmp_path / "dask-logs").glob("*.err"))) >= 2
    assert slurm_jobs_gone("dask-")

    # a stage that fails inside the cluster still cancels its worker jobs
    with pytest.raises(RuntimeError, match="stage failed"), dask_client(dask, 2, "failing"):
        raise RuntimeError("stage failed")
    assert slurm_jobs_gone("dask-failing")
