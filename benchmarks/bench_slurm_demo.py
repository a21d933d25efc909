"""Benchmark: the demo workflow through Slurm vs. locally, from empty results, side by side.

Both runs start from a copy of the repository's tracked files (the working tree, so uncommitted
edits count) with empty ``results/``:

- local: ``snakemake --cores 2`` (what ``make demo`` runs);
- slurm: the README's two commands, literally (link the profile under a fresh HOME's
  ``~/.config/snakemake/slurm``, then ``snakemake --profile slurm``), against a running cluster.

Prints both wall times, their ratio (slurm / local), the Slurm jobs submitted, and whether every
``metrics.csv`` is byte-identical. Needs a running Slurm (``.ci/slurm/start.sh``); without one it
prints SKIP and exits 0. Exit 1 if a run fails or the metrics differ.

    .venv/bin/python benchmarks/bench_slurm_demo.py            # config/config.yaml (the demo)
    .venv/bin/python benchmarks/bench_slurm_demo.py --tiny     # the tests' tiny config
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_slurm import copy_repo, readme_slurm_commands  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - t0, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny config, not the demo")
    ap.add_argument("--keep", action="store_true", help="keep the two copies")
    args = ap.parse_args()
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        print("SKIP: no Slurm cluster answers `sinfo` (start one: .ci/slurm/start.sh)")
        return 0
    base = Path(tempfile.mkdtemp(prefix="bench_slurm_", dir="/work" if Path("/work").is_dir()
                                 else None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    times, logs = {}, {}
    for mode in ("local", "slurm"):
        repo = base / mode / "repo"
        copy_repo(repo)
        if args.tiny:
            from test_workflow import tiny_config, write_config

            write_config(repo, tiny_config(repo))
        logs[mode] = base / f"{mode}.log"
        if mode == "local":
            cmd = [sys.executable, "-m", "snakemake", "--cores", "2"]
            run_env = env
        else:
            home = base / "home"
            home.mkdir()
            script = "set -e\n" + "\n".join(readme_slurm_commands()) + "\n"
            cmd, run_env = ["bash", "-c", script], dict(env, HOME=str(home))
        times[mode], rc = timed(cmd, repo, run_env, logs[mode])
        print(f"{mode}: {times[mode]:.0f} s (rc {rc}, log {logs[mode]})")
        if rc:
            return 1
    jobs = len(re.findall(r"submitted with SLURM jobid", logs["slurm"].read_text()))
    local_res, slurm_res = base / "local/repo/results", base / "slurm/repo/results"
    metrics = sorted(p.relative_to(local_res) for p in local_res.glob("*/*/metrics.csv"))
    same = bool(metrics) and all((local_res / m).read_bytes() == (slurm_res / m).read_bytes()
                                 for m in metrics)
    print(f"Slurm jobs submitted: {jobs}; metrics.csv identical: {same} ({len(metrics)} files)")
    print(f"SUMMARY slurm/local wall time = {times['slurm'] / times['local']:.2f} "
          f"({times['slurm']:.0f} s / {times['local']:.0f} s, "
          f"{'tiny' if args.tiny else 'demo'} config)")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
