"""Agglomeration at scale: the flat global merge vs the hierarchical one (agglomerate.hierarchy).

For each size (default 128^3, 256^3, 512^3, 1024^3 voxels) a synthetic volume of network-like
affinities is written to disk blockwise (uint8; objects are jittered grid cells of 24 voxels
whose boundaries are widened by one voxel, 0.8 a + 0.1 + N(0, 0.03), clipped), then agglomerated
end to end twice, each run in a fresh process: ``hierarchy: null`` (one global merge) and
``hierarchy: [2, 2, 2]`` (an octree of blocks). Fragments: the default per-section seeded
watershed in tiles of 128 (waterz's 3-D watershed makes a fragment every few voxels on these
noisy affinities); block 64 x 128 x 128; thresholds 0.3 / 0.5 / 0.7; the default stitching
across tile edges (``stitch_threshold: 0.5``) for both.

The block and node tasks run in a pool of 2 worker processes (Dask's ``processes`` scheduler),
as on a cluster, where the job that runs the stage is a client and every task runs in a worker.
Prints per size and run: fragments, the wall time and the largest worker's peak RSS of each step
(fragments, edges, merge levels, segment ids down, relabel; the kernel's VmHWM, reset at each
step), and the peak RSS of the largest single process (the client's or a worker's); for the
octree also the largest node of every level (edges it merged, residual edges it passed up,
from the nodes' files), which is what the top levels' memory follows. Then the growth of peak
RSS and of time per voxel from the second size to the largest, and a projection to 10^12 voxels
from the measured per-block figures of the largest run, with the largest node (the one below
the root, which grows with the volume's cross-section) scaled up from its measured size. Both
runs' segmentations are compared (they must be identical).

    python benchmarks/bench_agglomerate_scale.py --sizes 128 256     # quick
    python benchmarks/bench_agglomerate_scale.py                     # up to 1024^3 (hours)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak_rss import peak_rss_gb

BLOCK = (64, 128, 128)
CELL = 24


def labels_of(z0: int, z1: int, n: int, seed: int) -> np.ndarray:
    """Labels (z1 - z0, n, n) of jittered grid cells: cell (i, j, k) is id 1 + raster index;
    each voxel's cell is looked up at its position plus a smooth per-axis offset."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, (3, 3))
    z, y, x = np.meshgrid(np.arange(z0, z1), np.arange(n), np.arange(n), indexing="ij",
                          sparse=True)
    wob = [4 * np.sin(y / 17 + phase[a, 0]) + 4 * np.sin(x / 23 + phase[a, 1]) +
           3 * np.sin(z / 19 + phase[a, 2]) for a in range(3)]
    k = -(-n // CELL) + 1
    cz = np.clip(((z + wob[0]) // CELL).astype(np.int64), 0, k - 1)
    cy = np.clip(((y + wob[1]) // CELL).astype(np.int64), 0, k - 1)
    cx = np.clip(((x + wob[2]) // CELL).astype(np.int64), 0, k - 1)
    return (1 + (cz * k + cy) * k + cx).astype(np.uint64)


def make(work: Path, n: int, seed: int = 0) -> None:
    """Write work/affinities.zarr (3, n, n, n) uint8 slab by slab (64 sections)."""
    import zarr

    from tokenunify.affinities import seg_to_affinities, widen_borders
    from tokenunify.io.zarrio import create_volume

    g = zarr.open_group(str(work / "affinities.zarr"), mode="w")
    a = create_volume(g, "affinities", (n, n, n), BLOCK, np.uint8, [10, 10, 10], [0, 0, 0],
                      channels=3, attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],
                                         "channel_order": ["z", "y", "x"], "scale": 255.0})
    rng = np.random.default_rng(seed + 1)
    for z0 in range(0, n, BLOCK[0]):
        z1 = min(z0 + BLOCK[0], n)
        lo = max(z0 - 1, 0)  # one section below, for the z affinities and the widening
        lab = widen_borders(labels_of(lo, z1, n, seed), 1)
        aff = seg_to_affinities(lab)[:, z0 - lo:]
        aff = np.clip(0.8 * aff + 0.1 + rng.normal(0, 0.03, aff.shape).astype(np.float32), 0, 1)
        a[:, z0:z1] = np.rint(aff * 255).astype(np.uint8)


def agglomerate(work: Path, hierarchy) -> dict:
    """One end-to-end run, its block tasks in a pool of 2 worker processes (as on a cluster,
    where every task runs in a worker): wall time per step, and the peak RSS (VmHWM, reset at
    each step) of the client (this process) and of the largest worker; for the octree, the
    largest node of every level from the nodes' own files."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import dask
    import zarr

    from tokenunify.agglomerate import AgglomerateConfig, run
    from tokenunify.agglomerate import blockwise as bw

    cfg = AgglomerateConfig(block=BLOCK, thresholds=(0.3, 0.5, 0.7), tile=128, context=16,
                            hierarchy=hierarchy, workers=2, scheduler="processes")
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(int).result()  # the workers started before anything is timed
    steps: dict = {}
    peaks: dict = {}
    overall = {"client": 0.0, "worker": 0.0}

    def reset() -> None:  # fold the peaks so far into the overall ones, start new ones
        overall["client"] = max(overall["client"], peak_rss_gb(reset=True))
        for p in list(pool._processes):
            overall["worker"] = max(overall["worker"], peak_rss_gb(p, reset=True))

    compute = bw._compute

    def timed(tasks, cfg, desc, client=None):
        if not tasks:  # a step asked again when everything is done (the levels recurse): no
            return compute(tasks, cfg, desc, client)  # measurement, it would read leftovers
        reset()
        t0 = time.perf_counter()
        compute(tasks, cfg, desc, client)
        steps[desc] = steps.get(desc, 0.0) + time.perf_counter() - t0
        worker = max([peak_rss_gb(p) for p in list(pool._processes)] + [0.0])
        old = peaks.get(desc, (0.0, 0.0))
        peaks[desc] = (max(old[0], peak_rss_gb()), max(old[1], worker))

    bw._compute = timed
    out = work / f"seg_{'h' if hierarchy else 'flat'}.zarr"
    nodes: dict = {}  # level -> [edges merged, residual edges] of its largest node
    with dask.config.set(pool=pool):
        t0 = time.perf_counter()
        stage = run(work / "affinities.zarr", out, cfg, phase="merge")  # keeps the nodes' files
        for f in (stage / ".work" / "levels").glob("*.merges.npz"):
            with np.load(f) as z:
                big = nodes.setdefault(int(f.name.split("_")[0]), [0, 0])
                big[0], big[1] = max(big[0], int(z["edges"])), max(big[1], int(z["residual"]))
        out = run(work / "affinities.zarr", out, cfg)
        total = time.perf_counter() - t0
    reset()
    pool.shutdown()
    root = zarr.open_group(str(out), mode="r")
    n_frag = int(root["graph"].attrs["n_fragments"])
    return {"seconds": total, "steps": steps, "peaks": peaks, "nodes": nodes,
            "fragments": n_frag, "client_gb": overall["client"], "worker_gb": overall["worker"],
            "peak_rss_gb": max(overall.values()), "out": str(out)}


def spawn(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def same(a: str, b: str) -> bool:
    import zarr

    ra, rb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = [k for k in ra.array_keys() if k.startswith("threshold_")]
    n = ra[names[0]].shape[0]  # slab by slab: two whole 1024^3 uint64 arrays are 16 GB
    return all(np.array_equal(ra[k][z:z + BLOCK[0]], rb[k][z:z + BLOCK[0]])
               for k in names for z in range(0, n, BLOCK[0]))


def project_top(n: int, hier: dict, side: float) -> str:
    """The largest node at a cube of ``side`` voxels, from the octree run of an n^3 cube.

    A node holds its children's residuals: the segments along the faces between them. The
    largest node is the one below the root (half the volume, the same shape at any size), and
    its faces grow with the cross-section: edges, time and memory above the workers' base scale
    by (side / n)^2. Bytes per edge: the largest node's level against level 0 (peak RSS of the
    level's largest worker, per edge of its largest node)."""
    nodes = {int(k): v for k, v in hier["nodes"].items()}  # JSON made the levels strings
    peaks, steps = hier["peaks"], hier["steps"]
    top = max(nodes, key=lambda k: nodes[k][0])
    e1, e0 = nodes[top][0], nodes[0][0]
    p1, p0 = peaks[f"merge level {top}"][1], peaks["merge level 0"][1]
    per_edge = (p1 - p0) * 2**30 / max(e1 - e0, 1)
    scale = (side / n) ** 2
    return (f"PROJECTION largest node at {side:.0e}^3 voxels: level {top} at {n}^3 merged {e1} "
            f"edges in {steps[f'merge level {top}']:.0f} s with {p1:.2f} GB "
            f"({per_edge:.0f} B per edge above level 0); x (side / n)^2 = {scale:.0f}: about "
            f"{e1 * scale:.2e} edges, {(p1 + per_edge * e1 * (scale - 1) / 2**30):.0f} GB and "
            f"{steps[f'merge level {top}'] * scale / 3600:.1f} h in one task, on the levels' "
            f"critical path")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work, what = Path(args.child[0]), args.child[1]
        if what == "make":
            make(work, int(args.child[2]))
            res = {}
        else:
            res = agglomerate(work, None if what == "flat" else [2, 2, 2])
        print("RESULT " + json.dumps(res))
        return 0
    from tokenunify.agglomerate.merge import compiled_extension

    compiled_extension()  # any build of the merge kernel happens here, not inside a measured run
    rows = []
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"aggscale{n}_"))
        try:
            t0 = time.perf_counter()
            spawn(work, "make", n)
            made = time.perf_counter() - t0
            flat, hier = spawn(work, "flat"), spawn(work, "hier")
            ok = same(flat["out"], hier["out"])
            for name, r in (("flat", flat), ("octree", hier)):
                st = " ".join(f"{k.replace('merge level ', 'L').replace('segment ids down level ', 'D')}"
                              f"={v:.1f}s/{r['peaks'][k][1]:.2f}GB" for k, v in r["steps"].items())
                st += f" other={r['seconds'] - sum(r['steps'].values()):.1f}s"
                print(f"{n}^3 {name:6s} fragments {r['fragments']:>9} total {r['seconds']:8.1f} s"
                      f"  peak RSS: largest process {r['peak_rss_gb']:.2f} GB (client "
                      f"{r['client_gb']:.2f}, largest worker {r['worker_gb']:.2f})  [step=time/"
                      f"largest worker: {st}]  (volume written in {made:.0f} s)", flush=True)
            print(f"{n}^3 octree largest node per level (edges merged / residual passed up): "
                  + ", ".join(f"L{k} {e}/{r}" for k, (e, r) in sorted(hier["nodes"].items())),
                  flush=True)
            print(f"{n}^3 segmentations identical: {ok}", flush=True)
            rows.append((n, flat, hier, ok))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) >= 2:
        (n0, f0, h0, _), (n1, f1, h1, _) = rows[1 if len(rows) > 2 else 0], rows[-1]
        growth = h1["peak_rss_gb"] / h0["peak_rss_gb"] - 1
        tpv = (h1["seconds"] / n1 ** 3) / (h0["seconds"] / n0 ** 3) - 1
        print(f"SUMMARY octree from {n0}^3 to {n1}^3: peak RSS {growth:+.0%}, time per voxel "
              f"{tpv:+.0%}; flat peak RSS {f1['peak_rss_gb'] / f0['peak_rss_gb'] - 1:+.0%}")
        blocks = np.prod([-(-n1 // b) for b in BLOCK])
        per_block = h1["seconds"] * 2 / blocks  # core-seconds per block (2 workers)
        big = 1e12 / np.prod(BLOCK)
        print(f"PROJECTION 10^12 voxels: {big:.2e} blocks, {per_block:.2f} core-s per block -> "
              f"{big * per_block / 1000 / 3600:.1f} h on 1000 cores (octree, levels in sequence "
              f"ignored); block tasks' memory as measured at {n1}^3")
        print(project_top(n1, h1, 1e4))
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
