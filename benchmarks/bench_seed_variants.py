"""Seed settings of the 3-D seeded watershed (``maxima_distance_3d``) on predicted affinities.

Does a better seeding lower the fragments' own merge error, the floor that no merge threshold
removes? For an ``affinities.zarr`` predicted by the pipeline on a NeuroProof part (the recipe's
validation part, z 50-99, by default) this makes the fragments with each setting of
:func:`tokenunify.agglomerate.fragments.distance_fragments` (inside threshold on the mean
affinity, Gaussian sigma of the distance transform in voxels, seed window in voxels), scores
the fragments alone (VOI split / merge against the ground truth, label 0 ignored; and the merge
again with the ground truth's 1-voxel band around its boundaries ignored, which tells merges of
bodies from boundary voxels given to the wrong side), merges them
with waterz's mean affinity at each threshold, and prints the best VOI / ARAND and its
threshold, each VOI's ratio to the pipeline's defaults (the first row), and seconds per row.
Only validation data is read: the recipe's seeds are chosen here, never on the test part.

    python benchmarks/bench_seed_variants.py \\
        --affinities results/none/neuroproof_validate/affinities.zarr --z 50 100

Skips (exit 0, SKIP) when the data or the affinities are absent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from bench_fragments_ceiling import NEUROPROOF, test_labels
from bench_neuroproof_choices import MEAN

from tokenunify import metrics
from tokenunify.affinities import widen_borders
from tokenunify.agglomerate import fragments
from tokenunify.agglomerate.whole_volume import waterz_segmentations

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9)
# (threshold, sigma, window): the defaults first, then one change at a time, then pairs
VARIANTS = [
    (fragments.SEED_THRESHOLD_3D, fragments.SEED_SIGMA_3D, fragments.SEED_WINDOW_3D),
    (0.6, 1.0, 5), (0.7, 1.0, 5), (0.8, 1.0, 5),
    (0.5, 1.0, 3), (0.5, 0.0, 5), (0.5, 2.0, 5), (0.5, 1.0, 7),
    (0.5, 0.5, 3), (0.7, 1.0, 3),
]


@contextlib.contextmanager
def quiet_stdout():
    """waterz prints from C++: silence file descriptor 1 for the duration."""
    sys.stdout.flush()
    fd, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        os.dup2(fd, 1)
        os.close(null)
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--affinities", type=Path, required=True,
                    help="a NeuroProof part's affinities.zarr predicted by the pipeline")
    ap.add_argument("--z", type=int, nargs=2, default=(50, 100),
                    help="the part's z range in the NeuroProof volume (default: validation)")
    args = ap.parse_args()
    if not NEUROPROOF.exists() or not args.affinities.exists():
        print(f"SKIP: {NEUROPROOF} or {args.affinities} is absent")
        return 0
    labels = test_labels(Path(tempfile.mkdtemp(prefix="bench_seeds_")), *args.z)
    arr = zarr.open_group(str(args.affinities), mode="r")["affinities"]
    aff = np.ascontiguousarray(arr[:].astype(np.float32) / np.float32(arr.attrs["scale"]))
    if aff.shape[1:] != labels.shape:
        raise SystemExit(f"{args.affinities}: shape {aff.shape[1:]}, the labels of z "
                         f"{args.z[0]}-{args.z[1]} are {labels.shape}")
    banded = widen_borders(labels, 1)  # in-plane, as fine-tuning widens its targets
    print(f"ground truth's 1-voxel boundary band: {(banded == 0).mean():.1%} of the voxels\n")
    print("| inside > | sigma | window | fragments | fragments' VOI split / merge | merge, band "
          "ignored | best VOI (split, merge) | ARAND | at t | VOI / defaults' | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = None
    for thr, sigma, window in VARIANTS:
        t0 = time.perf_counter()
        frag = fragments.distance_fragments(aff, thr, sigma, window).astype(np.uint64)
        alone, n = metrics.evaluate(labels, frag), int(frag.max())
        band = metrics.evaluate(banded, frag)
        with quiet_stdout():
            segs = waterz_segmentations(aff, THRESHOLDS, MEAN, frag).values()
        scores = [metrics.evaluate(labels, s) for s in segs]
        i = int(np.argmin([s.voi for s in scores]))
        best = scores[i]
        ref = ref or best.voi
        print(f"| {thr:g} | {sigma:g} | {window} | {n} | {alone.voi_split:.3f} / "
              f"{alone.voi_merge:.3f} | {band.voi_merge:.3f} | {best.voi:.3f} ({best.voi_split:.3f}, "
              f"{best.voi_merge:.3f}) | {best.arand:.3f} | {THRESHOLDS[i]:g} | "
              f"{best.voi / ref:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
