"""Cost of the missing-chunk check (``require_complete``) next to the stages that read the arrays.

Every stage lists the chunk files of its pipeline-written inputs before computing
(:func:`tokenunify.io.zarrio.require_complete`). Measured side by side in one run, on arrays
written with the pipeline's writer (``create_volume``) in chunks of ``--chunks`` voxels (default
8 x 32 x 32: a 250^3 volume then has 2048 chunks per array, far more chunks per voxel than the
pipeline's own 32 x 256 x 256, so the check's share is over-, not under-estimated):

- ``raw`` (uint8): the check vs a full read of the array and vs ``tokenize.run`` on it;
- ``affinities`` (uint8, 3 channels): the check vs a full read and vs the agglomerate stage's
  ``fragments`` step (``agglomerate.run(..., phase="fragments")``, block 32 x 128 x 128, 2
  threads);
- ``labels`` + ``threshold_0.500`` (uint64): both checks vs full reads of both and vs
  ``evaluate.run``;
- unless ``--no-scale``: a 32 x 1024 x 1024 uint8 array in 1 x 32 x 32 chunks (32768 chunk
  files): the check vs a full read, to show that the check grows with the chunk count only.

Stage times include the stage's own check (so the ratio is check / stage as run).

Input: NeuroProof 250^3 (grayscale PNGs, ground-truth bodies, the over-segmentation as the
segmentation) when ../shared/data is present, else a synthetic volume of ``--shape``
(``tokenunify.data.synthetic``). The check is the best of ``--repeat`` runs, so are full reads;
a stage runs once. The page cache is warm for all (the arrays were just written). Pass criterion:
check / stage <= 5 % for every stage; exit code 0 if it holds, else 1.

    .venv/bin/python benchmarks/bench_chunk_check.py               # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_chunk_check.py --quick       # without the 32768 chunks
    .venv/bin/python benchmarks/bench_chunk_check.py --chunks 32 256 256   # pipeline chunks
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NEUROPROOF = REPO.parent / "shared" / "data" / "neuroproof_fib_medulla_250"


def volumes(shape, seed: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(description, raw uint8, ground truth uint64, segmentation uint64)."""
    if NEUROPROOF.exists():
        import gzip
        import io

        import h5py
        import imageio.v3 as iio
        from bench_agglomerate import neuroproof_labels

        raw = np.stack([iio.imread(p) for p in sorted((NEUROPROOF / "grayscale_maps").glob(
            "*.png"))]).astype(np.uint8)
        with gzip.open(NEUROPROOF / "oversegmented_stack_labels.h5.gz", "rb") as f:
            with h5py.File(io.BytesIO(f.read()), "r") as h:
                seg = h["stack"][:].astype(np.uint64)
        return "NeuroProof 250^3", raw, neuroproof_labels(), seg
    from tokenunify.data.synthetic import generate

    v = generate(tuple(shape), seed=seed)
    gt = v["labels"].astype(np.uint64)
    rng = np.random.default_rng(seed)
    seg = gt * 2 + (rng.random(gt.shape) < 0.01)  # a few speckle splits
    return f"synthetic {list(shape)}", v["raw"], gt, seg


def write(path: Path, name: str, data: np.ndarray, chunks, channels=None, attrs=None):
    import zarr

    from tokenunify.io.zarrio import create_volume

    g = zarr.open_group(str(path), mode="a", zarr_format=3)
    shape = data.shape[1:] if channels else data.shape
    a = create_volume(g, name, shape, chunks, data.dtype, (10, 10, 10), (0, 0, 0),
                      attrs=attrs, channels=channels)
    a[:] = data
    return a


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, nargs=3, default=[8, 32, 32], help="z y x voxels")
    p.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256],
                   help="synthetic volume (without ../shared/data)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ratio", type=float, default=0.05)
    p.add_argument("--no-scale", dest="scale", action="store_false",
                   help="skip the 32768-chunk array (chunks 1 x 32 x 32)")
    p.add_argument("--quick", action="store_true", help="the same as --no-scale")
    args = p.parse_args(argv)
    args.scale &= not args.quick

    import zarr

    from tokenunify import tokenize
    from tokenunify.affinities import seg_to_affinities, widen_borders
    from tokenunify.agglomerate import AgglomerateConfig
    from tokenunify.agglomerate import run as agglomerate
    from tokenunify.config import TokenizeConfig
    from tokenunify.evaluate import run as evaluate
    from tokenunify.io.zarrio import require_complete

    chunks = tuple(args.chunks)
    what, raw, gt, seg = volumes(args.shape, args.seed)
    rng = np.random.default_rng(args.seed)
    aff = seg_to_affinities(widen_borders(gt, 1))
    aff = np.rint(255 * np.clip(0.8 * aff + 0.1 + rng.normal(0, 0.1, aff.shape), 0, 1))
    aff = aff.astype(np.uint8)
    work = Path(tempfile.mkdtemp(prefix="bench_chunk_check_"))
    rows, ok = [], True
    try:
        data, segz, affz = work / "data.zarr", work / "seg.zarr", work / "affinities.zarr"
        arrays = {"raw": write(data, "raw", raw, chunks),
                  "labels": write(data, "labels", gt, chunks),
                  "threshold_0.500": write(segz, "threshold_0.500", seg, chunks),
                  "affinities": write(affz, "affinities", aff, chunks, channels=3,
                                      attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]],
                                             "scale": 255.0})}
        zarr.open_group(str(segz), mode="a").attrs.update(
            {"thresholds": [0.5], "arrays": ["threshold_0.500"]})
        for a in arrays.values():  # the arrays as a stage opens them
            require_complete(a, "bench")
        r = {name: zarr.open_group(str(a.store_path.store.root), mode="r")[name]
             for name, a in arrays.items()}
        n_chunks = {name: int(np.prod(a.cdata_shape)) for name, a in r.items()}
        check = {name: best(lambda a=a: require_complete(a, "bench"), args.repeat)
                 for name, a in r.items()}
        read = {name: best(lambda a=a: a[:], args.repeat) for name, a in r.items()}

        tok_cfg = TokenizeConfig(crop=(16, 128, 128), patch=(4, 16, 16), workers=2)
        t_tok = once(lambda: tokenize.run(data, work / "t.zarr", work / "t.parquet", tok_cfg))
        t_frag = once(lambda: agglomerate(affz, work / "s.zarr", AgglomerateConfig(
            block=(32, 128, 128), workers=2), phase="fragments"))
        t_eval = once(lambda: evaluate(segz, data, work / "m.csv", "bench", "bench"))
        if args.scale:  # many more chunks: the check vs a full read only
            big = write(work / "big.zarr", "raw", np.tile(raw[:32, :128, :128], (1, 8, 8)),
                        (1, 32, 32))
            n_chunks["big"] = int(np.prod(big.cdata_shape))
            check["big"] = best(lambda: require_complete(big, "bench"), args.repeat)
            read["big"] = best(lambda: big[:], args.repeat)

        for arrs, stage, t_stage in ((["raw"], "tokenize", t_tok),
                                     (["affinities"], "agglomerate fragments", t_frag),
                                     (["labels", "threshold_0.500"], "evaluate", t_eval)):
            t_check = sum(check[a] for a in arrs)
            t_read = sum(read[a] for a in arrs)
            ratio = t_check / t_stage
            ok &= ratio <= args.max_ratio
            rows.append((" + ".join(arrs), sum(n_chunks[a] for a in arrs), t_check, t_read,
                         stage, t_stage, t_check / t_read, ratio))
        if args.scale:
            rows.append(("raw 32 x 1024 x 1024", n_chunks["big"], check["big"], read["big"], "-",
                         float("nan"), check["big"] / read["big"], float("nan")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"input: {what}, chunks {list(chunks)} (z y x), check best of {args.repeat}")
    print(f"{'array(s)':<24} {'chunks':>7} {'check ms':>9} {'us/chunk':>9} {'read ms':>8}"
          f" {'stage':<22} {'stage s':>8} {'check/read':>11} {'check/stage':>12}")
    for arrs, n, tc, tr, stage, ts, cr, cs in rows:
        staged = f"{ts:>8.2f} {100 * cr:>10.2f}% {100 * cs:>11.3f}%" if ts == ts else \
            f"{'-':>8} {100 * cr:>10.2f}% {'-':>12}"
        print(f"{arrs:<24} {n:>7} {1e3 * tc:>9.2f} {1e6 * tc / n:>9.2f} {1e3 * tr:>8.1f}"
              f" {stage:<22} {staged}")
    worst = max(r[-1] for r in rows if r[-1] == r[-1])
    print(f"SUMMARY chunk check: worst check/stage {100 * worst:.3f}% (target <= "
          f"{100 * args.max_ratio:.0f}%): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
