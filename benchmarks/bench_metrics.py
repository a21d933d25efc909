"""Benchmark: ``tokenunify.metrics.evaluate`` vs scikit-image on one label volume.

Measured: wall time (best of ``--repeat``) of ``tokenunify.metrics.evaluate(gt, seg)`` against
``skimage.metrics.variation_of_information(gt, seg, ignore_labels=(0,))`` plus
``skimage.metrics.adapted_rand_error(gt, seg, ignore_labels=(0,))`` together, on the same uint64
volumes, measured side by side in one run. ``gt`` is a 3D Voronoi partition of ``--size``^3
voxels around ``--labels`` random seeds, with its cell boundaries (and a small slab) set to 0;
``seg`` is ``gt`` before zeroing, with some cells merged into a neighbour, some split in two by a
plane, a small zero-labelled region, and relabelled (shuffled ids, different id range).

Pass criterion: VOI split, VOI merge and ARAND agree with skimage within 1e-9 (absolute), and
the speedup skimage / ours is at least ``--min-speedup`` (5x). Exit code 0 if both hold, else 1.

    .venv/bin/python benchmarks/bench_metrics.py            # 256^3, ~500 labels
    .venv/bin/python benchmarks/bench_metrics.py --quick    # 96^3, ~100 labels
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def voronoi_labels(size: int, n_labels: int, rng: np.random.Generator,
                   slab: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(labels 1..n uint64 of shape size^3, seed positions (n, 3)), nearest-seed partition."""
    from scipy.spatial import cKDTree

    seeds = rng.uniform(0, size, size=(n_labels, 3))
    tree = cKDTree(seeds)
    out = np.empty((size, size, size), np.uint64)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for z0 in range(0, size, slab):
        z1 = min(z0 + slab, size)
        zz = np.broadcast_to(np.arange(z0, z1)[:, None, None], (z1 - z0, size, size))
        pts = np.stack([zz.ravel(), np.broadcast_to(yy, zz.shape).ravel(),
                        np.broadcast_to(xx, zz.shape).ravel()], 1).astype(np.float64)
        _, idx = tree.query(pts, workers=2)
        out[z0:z1] = (idx + 1).reshape(z1 - z0, size, size)
    return out, seeds


def make_pair(size: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gt, seg), both uint64 (size, size, size); see the module docstring."""
    rng = np.random.default_rng(seed)
    cells, seeds = voronoi_labels(size, n_labels, rng)

    # gt: cells with their boundaries (membranes) and a small unlabelled slab set to 0.
    gt = cells.copy()
    boundary = np.zeros(gt.shape, bool)
    for ax in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        boundary[tuple(a)] |= cells[tuple(a)] != cells[tuple(b)]
    gt[boundary] = 0
    gt[:, :, : max(1, size // 32)] = 0

    # seg: merge ~10% of cells into another cell, split ~10% by a plane through their seed.
    n = n_labels
    lut = np.arange(n + 1, dtype=np.uint64)
    ids = rng.permutation(np.arange(1, n + 1))
    n_merge, n_split = n // 10, n // 10
    merged, split = ids[:n_merge], ids[n_merge:n_merge + n_split]
    lut[merged] = rng.choice(ids[n_merge:], size=n_merge)  # into an unmerged cell
    seg = lut[cells]
    zz = np.arange(size)[:, None, None]
    for k, lab in enumerate(split):
        cz = seeds[lab - 1, 0]
        sel = (cells == lab) & (zz > cz)
        seg[sel] = n + 1 + k
    seg[size // 2: size // 2 + 4, size // 4: size // 4 + 16, size // 4: size // 4 + 16] = 0
    # Shuffle and shift the seg ids (kept small: skimage sizes dense vectors by the largest id).
    n_seg = n + 1 + n_split
    perm = np.zeros(n_seg, np.uint64)
    perm[1:] = rng.permutation(np.arange(1, n_seg, dtype=np.uint64)) + np.uint64(1000)
    seg = perm[seg]
    return gt, seg


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def ours(gt, seg):
    from tokenunify.metrics import evaluate

    s = evaluate(gt, seg)
    return s.voi_split, s.voi_merge, s.arand


def skimage_ref(gt, seg):
    from skimage.metrics import adapted_rand_error, variation_of_information

    split, merge = variation_of_information(gt, seg, ignore_labels=(0,))
    are = adapted_rand_error(gt, seg, ignore_labels=(0,))[0]
    return float(split), float(merge), float(are)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="edge of the cubic volume (voxels)")
    p.add_argument("--labels", type=int, default=500, help="number of Voronoi cells in gt")
    p.add_argument("--repeat", type=int, default=3, help="timings per method; best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-speedup", type=float, default=5.0)
    p.add_argument("--tol", type=float, default=1e-9)
    p.add_argument("--quick", action="store_true", help="small sizes (96^3, 100 labels)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.labels = 96, 100

    t0 = time.perf_counter()
    gt, seg = make_pair(args.size, args.labels, args.seed)
    print(f"data: {gt.shape} uint64, {len(np.unique(gt)) - 1} gt labels "
          f"({100 * np.mean(gt == 0):.1f}% voxels 0), {len(np.unique(seg))} seg ids; "
          f"made in {time.perf_counter() - t0:.1f} s", flush=True)

    # Each side gets its own best-of-N on the same arrays: ours first, then skimage.
    t_ours, r_ours = best_of(lambda: ours(gt, seg), args.repeat)
    t_sk, r_sk = best_of(lambda: skimage_ref(gt, seg), args.repeat)
    names = ("voi_split", "voi_merge", "arand")
    diffs = [abs(a - b) for a, b in zip(r_ours, r_sk, strict=True)]
    for n, a, b, d in zip(names, r_ours, r_sk, diffs, strict=True):
        print(f"  {n:9s} ours {a:.12f}  skimage {b:.12f}  |diff| {d:.2e}")
    equal = all(d < args.tol for d in diffs)
    speedup = t_sk / t_ours
    ok = equal and speedup >= args.min_speedup
    print(f"SUMMARY bench_metrics: size {args.size}^3, {args.labels} labels: ours {t_ours:.3f} s, "
          f"skimage {t_sk:.3f} s (best of {args.repeat}); speedup skimage/ours {speedup:.1f}x "
          f"(need >= {args.min_speedup:g}x); results equal (<{args.tol:g}): {equal} -> "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
