"""Benchmark: Snakemake jobs planned for a volume of 10^5 or 10^6 blocks, with and without
batches, and with ``agglomerate.hierarchy``.

A volume of 10^5 blocks (3200 x 10240 x 6400) or 10^6 blocks (3200 x 25600 x 25600) of
32 x 256 x 256 voxels, an empty zarr declared as a dataset with roles pretrain, train and test.
``snakemake -n`` with the two experiments ``tokenunify`` and ``none`` is run for each plan:

- batched: ``batch_blocks: 1000`` for infer and agglomerate (the default);
- hierarchy (``--hierarchy``): batched, plus ``agglomerate.hierarchy: [2, 2, 2]`` (an octree;
  one batch of up to 1000 nodes per job at each level);
- unbatched (10^5 only; ``--unbatched``): ``batch_blocks: null`` (one job per blockwise stage,
  holding all the blocks).

Prints the jobs per rule and the total of each plan, its dry-run time, and the ratio of jobs to
blocks. Exit 1 if the batched plan has more than 1 job per 100 blocks.

    .venv/bin/python benchmarks/bench_job_count.py                         # 10^5, + unbatched
    .venv/bin/python benchmarks/bench_job_count.py --blocks 1e6 --hierarchy  # 10^6 blocks
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_workflow import snakemake, write_config  # noqa: E402

SHAPES = {10**5: (3200, 10240, 6400), 10**6: (3200, 25600, 25600)}
BLOCK = [32, 256, 256]


def plan(workdir: Path, shape, batch_blocks: int | None, hierarchy=None) -> dict[str, int]:
    import zarr

    workdir.mkdir()
    g = zarr.open_group(str(workdir / "big.zarr"), mode="w")
    for name, dtype in (("raw", "uint8"), ("labels", "uint64")):
        g.create_array(name, shape=shape, chunks=(64, 512, 512), dtype=dtype)
    g["labels"][:1, :1, :1] = 1  # check_config reads the test labels up to a non-zero block
    agglomerate = {"block": BLOCK, "batch_blocks": batch_blocks}
    if hierarchy:
        agglomerate.update(hierarchy=hierarchy, stitch_threshold=None)
    write_config(workdir, {
        "datasets": {"big": {"raw": {"source": "big.zarr", "key": "raw"},
                             "labels": {"source": "big.zarr", "key": "labels"},
                             "voxel_size": [40, 8, 8], "roles": ["pretrain", "train", "test"]}},
        "experiments": {"tokenunify": {"pretraining": "tokenunify"},
                        "none": {"pretraining": "none"}},
        "infer": {"block": BLOCK, "batch_blocks": batch_blocks},
        "agglomerate": agglomerate})
    t0 = time.perf_counter()
    proc = snakemake(workdir, "-n", "--quiet", "rules")
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    counts = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr,
                                               flags=re.M)}
    label = f"batch_blocks {batch_blocks}" + (f", hierarchy {hierarchy}" if hierarchy else "")
    print(f"{label}: {counts['total']} jobs, dry run {time.perf_counter() - t0:.0f} s; "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total"), flush=True)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=float, default=1e5, choices=[1e5, 1e6])
    ap.add_argument("--hierarchy", action="store_true", help="also plan with an octree")
    ap.add_argument("--unbatched", action="store_true", help="also plan with batch_blocks null")
    args = ap.parse_args()
    shape = SHAPES[int(args.blocks)]
    blocks = 1
    for n, b in zip(shape, BLOCK, strict=True):
        blocks *= -(-n // b)
    base = Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    totals = {"batched": plan(base / "a", shape, 1000)["total"]}
    if args.hierarchy:
        totals["hierarchy"] = plan(base / "h", shape, 1000, [2, 2, 2])["total"]
    if args.unbatched or args.blocks == 1e5:
        totals["unbatched"] = plan(base / "b", shape, None)["total"]
    print(f"SUMMARY {blocks} blocks, 2 experiments: " + ", ".join(
        f"{k} {v} jobs ({v / blocks:.5f} per block)" for k, v in totals.items()))
    # the bound is the batched plan's; the hierarchy adds one job per batch of nodes at every
    # level going up and (from level 1) going down, about 1.3 per 1000 blocks for an octree
    bounded = totals["batched"] <= blocks / 100
    return 0 if bounded else 1


if __name__ == "__main__":
    sys.exit(main())
