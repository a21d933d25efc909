"""Benchmark: Snakemake jobs planned for a volume of 10^5 blocks, with and without batches.

A 3200 x 10240 x 6400 volume (an empty zarr, declared as a dataset with roles pretrain, train and
test) is 100 000 blocks of 32 x 256 x 256. ``snakemake -n`` with the two experiments
``tokenunify`` and ``none`` is run twice in one go:

- batched: ``batch_blocks: 1000`` for infer and agglomerate (the default);
- unbatched: ``batch_blocks: null`` (one job per blockwise stage, holding all 10^5 blocks).

Prints the jobs per rule and the total of each, and the ratio of batched jobs to blocks. Exit 1
if the batched plan is not between 100 and 1000 jobs ("hundreds").

    .venv/bin/python benchmarks/bench_job_count.py
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_workflow import snakemake, write_config  # noqa: E402

SHAPE, BLOCK = (3200, 10240, 6400), [32, 256, 256]


def plan(workdir: Path, batch_blocks: int | None) -> dict[str, int]:
    import zarr

    g = zarr.open_group(str(workdir / "big.zarr"), mode="w")
    for name, dtype in (("raw", "uint8"), ("labels", "uint64")):
        g.create_array(name, shape=SHAPE, chunks=(64, 512, 512), dtype=dtype)
    g["labels"][:1, :1, :1] = 1  # check_config reads the test labels up to a non-zero block
    write_config(workdir, {
        "datasets": {"big": {"raw": {"source": "big.zarr", "key": "raw"},
                             "labels": {"source": "big.zarr", "key": "labels"},
                             "voxel_size": [40, 8, 8], "roles": ["pretrain", "train", "test"]}},
        "experiments": {"tokenunify": {"pretraining": "tokenunify"},
                        "none": {"pretraining": "none"}},
        "infer": {"block": BLOCK, "batch_blocks": batch_blocks},
        "agglomerate": {"block": BLOCK, "batch_blocks": batch_blocks}})
    t0 = time.perf_counter()
    proc = snakemake(workdir, "-n")
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    counts = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr,
                                               flags=re.M)}
    print(f"batch_blocks {batch_blocks}: {counts['total']} jobs, dry run "
          f"{time.perf_counter() - t0:.0f} s; " + ", ".join(
              f"{k} {v}" for k, v in counts.items() if k != "total"))
    return counts


def main() -> int:
    blocks = 1
    for n, b in zip(SHAPE, BLOCK, strict=True):
        blocks *= -(-n // b)
    base = Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    (base / "a").mkdir()
    (base / "b").mkdir()
    batched = plan(base / "a", 1000)["total"]
    unbatched = plan(base / "b", None)["total"]
    print(f"SUMMARY {blocks} blocks: {batched} jobs batched (jobs / blocks = "
          f"{batched / blocks:.5f}), {unbatched} jobs unbatched (each blockwise job holds all "
          f"{blocks} blocks)")
    return 0 if 100 <= batched <= 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
