"""Pretraining throughput (tokens/s) of the tiny preset on 1 vs 2 CPU processes (torchrun).

Tokenizes a synthetic volume into a temporary folder, runs ``tokenunify pretrain`` with
``--nproc 1`` and ``--nproc 2`` (DDP over gloo, one thread per process so both use the same two
cores), and compares the median tokens/s of metrics.jsonl (first step excluded). Prints the
ratio 2 processes / 1 process; scaling on a shared 2-core machine is the figure of interest,
there is no pass threshold (exit code 0 unless a run fails).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, nargs=3, default=(16, 96, 96))
    ap.add_argument("--quick", action="store_true", help="4 steps of 16x64x64 crops")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.crop = 4, (16, 64, 64)
    from tokenunify import download, tokenize
    from tokenunify.config import DownloadConfig, TokenizeConfig
    from tokenunify.io.datasets import DatasetSpec
    from tokenunify.io.sources import SourceSpec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        url = "synthetic://em?shape=32,192,192&seed=4"
        spec = DatasetSpec("bench", SourceSpec(url, key="raw"))
        download.run(spec, tmp / "d.zarr", DownloadConfig(block=(16, 192, 192)), progress=False)
        tokenize.run(tmp / "d.zarr", tmp / "t.zarr", tmp / "t.parquet",
                     TokenizeConfig(crop=tuple(args.crop), patch=(4, 16, 16)))
        spec_json = json.dumps({"experiment": {"pretraining": "tokenunify"},
                                "pretrain": {"steps": args.steps, "batch_size": args.batch,
                                             "warmup_steps": 1, "checkpoint_every": 1000}})
        rates = {}
        for nproc in (1, 2):
            out = tmp / f"n{nproc}"
            env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
            cmd = [sys.executable, "-m", "tokenunify.cli", "pretrain", "bench", "--tokens",
                   str(tmp / "t.zarr"), "--out", str(out), "--spec", spec_json,
                   "--nproc", str(nproc)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:])
                return 1
            lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
            rates[nproc] = statistics.median(r["tokens_per_s"] for r in lines[1:])
            print(f"nproc={nproc}: median {rates[nproc]:.0f} tokens/s over {len(lines) - 1} steps")
    print(f"SUMMARY bench_pretrain_throughput: tiny preset, crop {tuple(args.crop)}, global batch "
          f"{args.batch}: 2 processes / 1 process = {rates[2] / rates[1]:.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
