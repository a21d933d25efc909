"""Benchmark: throughput of the tokenize stage vs a plain zarr read + write of the same volume.

Measured, side by side in one run, on one uint8 zarr v3 volume made like the download stage makes
it (group with array ``raw``, chunks (32, 256, 256), Blosc zstd clevel 3; EM-like content:
smoothed noise in 30..230, written chunk by chunk):

- ours: ``tokenunify.tokenize.run(volume, out, manifest, TokenizeConfig(workers=2))`` (default
  crop/patch, threaded Dask with 2 workers): two passes over the volume, statistics then crops;
- plain: ``dask.array.from_zarr`` of ``raw`` -> ``dask.array.to_zarr`` into a new zarr v3 array
  with the same chunks and codec, threaded scheduler with 2 workers.

Throughput is the input volume size (MiB) over the wall time (best of ``--repeat``). Pass
criterion: throughput ours / plain >= ``--min-ratio`` (1/3). Exit code 0 if it holds, else 1.

    .venv/bin/python benchmarks/bench_tokenize.py            # 64 x 4096 x 4096 = 1 GiB
    .venv/bin/python benchmarks/bench_tokenize.py --quick    # 64 x 1024 x 2048 = 128 MiB
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHUNKS = (32, 256, 256)
WORKERS = 2


def noise_pool(chunks, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` EM-like uint8 blocks: Gaussian-smoothed noise mapped to about 30..230."""
    from scipy.ndimage import gaussian_filter

    pool = []
    for _ in range(n):
        f = gaussian_filter(rng.standard_normal(chunks, dtype=np.float32), (1.0, 2.0, 2.0))
        f *= 100.0 / (6 * f.std())  # +-3 sigma -> +-50
        pool.append(f)
    return pool


def make_volume(path: Path, shape, seed: int = 0) -> None:
    """Write the input group ``path`` (array ``raw``) the way the download stage does."""
    import zarr

    from tokenunify.io.zarrio import blocks, create_volume

    rng = np.random.default_rng(seed)
    pool = noise_pool(CHUNKS, 8, rng)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = create_volume(root, "raw", shape, CHUNKS, np.uint8, (40.0, 8.0, 8.0), (0.0, 0.0, 0.0),
                        {"source": {"url": "bench_tokenize synthetic noise"}})
    boxes = [box for _, box in blocks(shape, CHUNKS)]
    picks = rng.integers(0, 2**31, size=len(boxes))

    def write(k):
        r = np.random.default_rng(int(picks[k]))
        box = boxes[k]
        f = pool[r.integers(len(pool))]
        f = f[tuple(slice(None, None, -1) if r.random() < 0.5 else slice(None) for _ in range(3))]
        base = r.uniform(110, 150)  # slowly varying brightness between blocks
        blk = np.clip(np.rint(f + base), 30, 230).astype(np.uint8)
        arr[box] = blk[tuple(slice(0, s.stop - s.start) for s in box)]

    with ThreadPoolExecutor(WORKERS) as ex:
        list(ex.map(write, range(len(boxes))))


def run_plain(src_path: Path, dst_path: Path) -> float:
    """Seconds to copy ``raw`` into a new zarr v3 array (same chunks and codec) with Dask."""
    import dask
    import dask.array as da
    import zarr

    shutil.rmtree(dst_path, ignore_errors=True)
    t0 = time.perf_counter()
    src = zarr.open_group(str(src_path), mode="r")["raw"]
    dst = zarr.create_array(str(dst_path), shape=src.shape, chunks=src.chunks, dtype=src.dtype,
                            fill_value=0, zarr_format=3,
                            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3))
    darr = da.from_zarr(src, chunks=src.chunks)
    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        da.to_zarr(darr, dst)
    return time.perf_counter() - t0


def run_ours(src_path: Path, out: Path, manifest: Path):
    """(seconds, manifest) of ``tokenunify.tokenize.run`` with 2 threaded Dask workers."""
    from tokenunify.config import TokenizeConfig
    from tokenunify.tokenize import run

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    df = run(src_path, out, manifest, TokenizeConfig(scheduler="threads", workers=WORKERS))
    return time.perf_counter() - t0, df


def check(src_path: Path, dst_path: Path, out: Path, df) -> bool:
    """Spot checks: the copy equals the source; first/last kept crops equal their source boxes."""
    import zarr

    src = zarr.open_group(str(src_path), mode="r")["raw"]
    dst = zarr.open_array(str(dst_path), mode="r")
    ok = bool(np.array_equal(src[:CHUNKS[0], :1024, :1024], dst[:CHUNKS[0], :1024, :1024]))
    crops = zarr.open_group(str(out), mode="r")["crops"]
    kept = df[df["kept"]]
    for i in (0, len(kept) - 1):
        z, y, x, idx = (int(kept.iloc[i][k]) for k in ("z", "y", "x", "index"))
        cz, cy, cx = crops.shape[1:]
        ok &= bool(np.array_equal(crops[idx], src[z:z + cz, y:y + cy, x:x + cx]))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[64, 4096, 4096], metavar=("Z", "Y", "X"),
                   help="volume shape in voxels (default 1 GiB)")
    p.add_argument("--repeat", type=int, default=1, help="runs per side (alternating); best kept")
    p.add_argument("--min-ratio", type=float, default=1 / 3)
    p.add_argument("--quick", action="store_true", help="64 x 1024 x 2048 (128 MiB)")
    args = p.parse_args(argv)
    if args.quick:
        args.shape = [64, 1024, 2048]
    shape = tuple(args.shape)
    mib = np.prod(shape) / 2**20

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp = Path(tmp)
        vol, copy = tmp / "vol.zarr", tmp / "copy.zarr"
        out, manifest = tmp / "tokens.zarr", tmp / "tokens.manifest.parquet"
        t0 = time.perf_counter()
        make_volume(vol, shape)
        stored = sum(f.stat().st_size for f in vol.rglob("*") if f.is_file()) / 2**20
        print(f"input: {shape} uint8 = {mib:.0f} MiB, stored {stored:.0f} MiB "
              f"(compression {mib / stored:.2f}x); made in {time.perf_counter() - t0:.1f} s",
              flush=True)

        t_plain = t_ours = float("inf")
        df = None
        for r in range(args.repeat):
            tp = run_plain(vol, copy)
            print(f"  run {r + 1}: plain {tp:.1f} s ({mib / tp:.0f} MiB/s)", flush=True)
            to, df = run_ours(vol, out, manifest)
            print(f"  run {r + 1}: ours  {to:.1f} s ({mib / to:.0f} MiB/s), kept "
                  f"{int(df['kept'].sum())} of {len(df)} crops", flush=True)
            t_plain, t_ours = min(t_plain, tp), min(t_ours, to)
        ok_data = check(vol, copy, out, df)

    thr_plain, thr_ours = mib / t_plain, mib / t_ours
    ratio = thr_ours / thr_plain
    ok = ratio >= args.min_ratio and ok_data
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"SUMMARY bench_tokenize: {mib:.0f} MiB volume {list(shape)}: ours {thr_ours:.1f} MiB/s "
          f"({t_ours:.1f} s), plain zarr read+write {thr_plain:.1f} MiB/s ({t_plain:.1f} s); "
          f"ratio ours/plain {ratio:.3f} (need >= {args.min_ratio:.3f}); spot checks "
          f"{'ok' if ok_data else 'FAILED'}; process peak RSS {peak:.0f} MiB -> "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
