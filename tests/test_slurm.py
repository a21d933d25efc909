"""The workflow through a real one-node Slurm cluster (.ci/slurm/start.sh), as users run it.

Runs only where CI=true or TOKENUNIFY_SLURM_TEST=1 (it installs and starts Slurm daemons, as
root); skipped elsewhere. The cluster is stopped afterwards, also when a test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent))
from test_workflow import snakemake, tiny_config, write_config  # noqa: E402

pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(os.environ.get("CI") != "true"
                       and os.environ.get("TOKENUNIFY_SLURM_TEST") != "1",
                       reason="starts a real Slurm cluster: only with CI=true or "
                              "TOKENUNIFY_SLURM_TEST=1"),
]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
STAGES = {"download", "tokenize", "pretrain", "finetune", "infer", "agglomerate", "evaluate",
          "report"}

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


def test_workflow_runs_every_rule_as_a_slurm_job_and_matches_a_local_run(cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    for wd in (local, remote):
        wd.mkdir()
        write_config(wd, tiny_config(wd))
    proc = snakemake(local)
    assert proc.returncode == 0, proc.stderr[-3000:]

    shim = tmp_path / "bin"
    shim.mkdir()
    real = Path(sys.executable).parent / "tokenunify"
    (shim / "tokenunify").write_text(FLAKY.format(marker=tmp_path / "failed_once", real=real))
    (shim / "tokenunify").chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow/Snakefile"),
           "--directory", str(remote), "--profile", str(PROFILE),
           "--slurm-init-seconds-before-status-checks", "1"]
    proc = subprocess.run(cmd, cwd=remote, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # every job of every stage went through sbatch, with its job id in the log
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+?)\)", log)
    rules = {re.search(r"rule_([a-z_]+)", path).group(1) for _, path in submitted}
    assert rules == STAGES
    for jobid, path in submitted:
        assert Path(path).exists() and Path(path).name == f"{jobid}.log"
    # the injected fault: report failed once in Slurm and was resubmitted
    assert (tmp_path / "failed_once").exists()
    assert sum("rule_report" in p for _, p in submitted) == 2
    # same numbers as the local run
    for exp in ("tokenunify", "none"):
        a = (local / "results" / exp / "lab" / "metrics.csv").read_text()
        b = (remote / "results" / exp / "lab" / "metrics.csv").read_text()
        assert a == b
    page = (remote / "results" / "report" / "index.html").read_text()
    assert all(w in page for w in ("tokenunify", "none", "lab"))
