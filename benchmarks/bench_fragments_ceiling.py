"""The ceiling of each fragment method on real EM: affinities made from the ground truth.

On NeuroProof's test part (z 200-249 of ../shared/data/neuroproof_fib_medulla_250, 10 nm
isotropic FIB-SEM, bodies mapped through ``transforms``), affinities are computed from the
labels (label boundaries widened by ``--widen`` voxels per side, as fine-tuning targets are),
mapped to 0.1 / 0.9, and agglomerated at t = 0.5 with each fragment method:

- ``maxima_distance`` (the official per-section seeded watershed, our default), blockwise;
- ``maxima_distance`` on whole sections with waterz's merge (the reference path);
- ``waterz`` (waterz's own 3-D watershed on the affinity graph), on the whole volume and
  blockwise in 3-D tiles (two tiles in z, 128 x 128 in y and x, stitched);
- ``maxima_distance_3d`` (the seeded watershed in 3-D) in the same 3-D tiles, not stitched,
  merged by the mean affinity (the NeuroProof recipe's).

With perfect affinities a fragment method should lose almost nothing; what it loses here is
the best any network can reach with it. Prints VOI split / merge / total and ARAND against the
labels (label 0 ignored) for each, and the ratio of the default's VOI to waterz's.
Skips (exit 0, SKIP) when the data is absent.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import zarr

from tokenunify import metrics
from tokenunify.affinities import seg_to_affinities, widen_borders
from tokenunify.agglomerate import AgglomerateConfig, run
from tokenunify.io.zarrio import create_volume

DATA = Path(os.environ.get("TOKENUNIFY_SHARED_DATA",
                           Path(__file__).resolve().parents[1].parent / "shared" / "data"))
NEUROPROOF = DATA / "neuroproof_fib_medulla_250"


def test_labels(tmp: Path, z0: int, z1: int, name: str = "groundtruth") -> np.ndarray:
    """Ids (z, y, x) uint64 of NeuroProof z0:z1 from ``name``.h5.gz (``stack`` mapped through
    ``transforms``): the ground-truth bodies, or the shipped supervoxels'
    (``oversegmented_stack_labels``) agglomerated bodies."""
    with gzip.open(NEUROPROOF / f"{name}.h5.gz") as f, open(tmp / f"{name}.h5", "wb") as g:
        shutil.copyfileobj(f, g)
    with h5py.File(tmp / f"{name}.h5") as f:
        stack, table = f["stack"][z0:z1], f["transforms"][:]
    lut = np.zeros(max(int(stack.max()), int(table[:, 0].max())) + 1, np.uint64)
    lut[table[:, 0]] = table[:, 1]
    return lut[stack]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widen", type=int, default=1, help="voxels per side (0: none)")
    ap.add_argument("--z", type=int, nargs=2, default=(200, 250),
                    help="z range (default: the test part; labels only, no prediction)")
    ap.add_argument("--quick", action="store_true", help="z 200-220")
    args = ap.parse_args()
    if not NEUROPROOF.exists():
        print(f"SKIP: {NEUROPROOF} is absent (see ../shared/data/*/SOURCE.md)")
        return 0
    z0, z1 = (200, 220) if args.quick else args.z
    tmp = Path(tempfile.mkdtemp())
    try:
        gt = test_labels(tmp, z0, z1)
        lab = widen_borders(gt, args.widen) if args.widen else gt
        aff = seg_to_affinities(lab).astype(np.float32) * 0.8 + 0.1
        g = zarr.open_group(str(tmp / "aff.zarr"), mode="w")
        create_volume(g, "affinities", gt.shape, (gt.shape[0], 128, 128), np.float32,
                      (10, 10, 10), (0, 0, 0), channels=3)[:] = aff
        methods = {
            "maxima_distance blockwise (default)": AgglomerateConfig(
                thresholds=(0.5,), block=(gt.shape[0], 128, 128)),
            "maxima_distance whole sections + waterz merge": AgglomerateConfig(
                thresholds=(0.5,), method="waterz", fragments="maxima_distance"),
            "waterz 3-D watershed + waterz merge": AgglomerateConfig(
                thresholds=(0.5,), method="waterz", fragments="waterz"),
            "waterz 3-D watershed in 3-D tiles, blockwise": AgglomerateConfig(
                thresholds=(0.5,), fragments="waterz", block=(gt.shape[0], 128, 128),
                tile_z=gt.shape[0] // 2 or 1),
            "maxima_distance_3d in 3-D tiles, mean, no stitching": AgglomerateConfig(
                thresholds=(0.5,), fragments="maxima_distance_3d", block=(gt.shape[0], 128, 128),
                tile_z=gt.shape[0] // 2 or 1, stitch_threshold=None,
                scoring="OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"),
        }
        print(f"NeuroProof z {z0}-{z1}, {gt.shape}, affinities from labels widened by "
              f"{args.widen}, t = 0.5")
        voi = {}
        for name, cfg in methods.items():
            t0 = time.perf_counter()
            out = run(tmp / "aff.zarr", tmp / f"seg{len(voi)}.zarr", cfg)
            seg = zarr.open_group(str(out))["threshold_0.500"][:]
            s = metrics.evaluate(gt, seg)
            voi[name] = s.voi
            print(f"{name:48s} VOI split {s.voi_split:.3f} merge {s.voi_merge:.3f} "
                  f"VOI {s.voi:.3f} ARAND {s.arand:.3f} ({time.perf_counter() - t0:.1f} s)")
        sv = metrics.evaluate(gt, test_labels(tmp, z0, z1, "oversegmented_stack_labels"))
        print(f"{'shipped supervoxels (reference)':48s} VOI split {sv.voi_split:.3f} merge "
              f"{sv.voi_merge:.3f} VOI {sv.voi:.3f} ARAND {sv.arand:.3f}")
        default, best = voi["maxima_distance blockwise (default)"], \
            voi["waterz 3-D watershed + waterz merge"]
        print(f"SUMMARY fragments ceiling: default VOI {default:.3f} / waterz fragments VOI "
              f"{best:.3f} = {default / max(best, 1e-9):.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
