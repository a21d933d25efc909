"""Benchmark: peak memory of the download stage when the volume grows 8x.

Measured: the peak resident set size of a fresh Python process that runs the download stage
(``tokenunify.cli.main(["download", NAME, "--config", CFG, "--out", OUT, "--workers", "2"])``,
what ``tokenunify download`` runs) on a chunked uint8 HDF5 volume of the base shape (default
64 x 512 x 512) and on one twice as large on every axis (128 x 1024 x 1024, 8x the voxels), with
``download: {block: [32, 256, 256]}`` (``--block``). Each size runs in its own child process,
which reports its own peak RSS, ``VmHWM`` from ``/proc/self/status`` (so each figure is for that
run only), and its peak right after importing the stage's modules, to show the stage's own share.
(Not ``ru_maxrss``: on Linux a fresh child's ``ru_maxrss`` starts at the RSS its parent had when
it forked, so it would partly measure this script; ``benchmarks/peak_rss.py``.)
The output ``raw`` array is compared with the source, whole, for both sizes.

Pass criterion: peak(big) / peak(small) <= ``--max-ratio`` (1.2) and both outputs equal their
input. Exit code 0 if both hold, else 1.

    .venv/bin/python benchmarks/bench_download_memory.py            # 64x512x512 vs 128x1024x1024
    .venv/bin/python benchmarks/bench_download_memory.py --quick    # 32x512x512 vs 64x1024x1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = (32, 256, 256)
H5_CHUNKS = (16, 256, 256)

# Runs in a fresh interpreter: argv[1] = config, argv[2] = dataset, argv[3] = output.
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[4])
from peak_rss import peak_rss_gb


def hwm_kib():  # peak RSS of this process image, in KiB
    return peak_rss_gb() * 2**20


import h5py, zarr, numpy  # what the download stage imports, to measure the baseline
import tokenunify.download, tokenunify.cli
base = hwm_kib()
rc = tokenunify.cli.main(["download", sys.argv[2], "--config", sys.argv[1], "--out", sys.argv[3],
                          "--workers", "2"])
print(json.dumps({"rc": rc, "import_kib": base, "peak_kib": hwm_kib()}))
"""


def noise_pool(chunks, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` EM-like float blocks: Gaussian-smoothed noise, about +-50 around 0."""
    from scipy.ndimage import gaussian_filter

    pool = []
    for _ in range(n):
        f = gaussian_filter(rng.standard_normal(chunks, dtype=np.float32), (1.0, 2.0, 2.0))
        f *= 100.0 / (6 * f.std())
        pool.append(f)
    return pool


def write_h5(path: Path, shape, seed: int) -> None:
    """A chunked uint8 HDF5 volume ``raw`` with EM-like content in 30..230, block by block."""
    import h5py

    rng = np.random.default_rng(seed)
    pool = noise_pool(H5_CHUNKS, 4, rng)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("raw", shape=shape, dtype=np.uint8, chunks=H5_CHUNKS)
        for z in range(0, shape[0], H5_CHUNKS[0]):
            for y in range(0, shape[1], H5_CHUNKS[1]):
                for x in range(0, shape[2], H5_CHUNKS[2]):
                    box = (slice(z, min(z + H5_CHUNKS[0], shape[0])),
                           slice(y, min(y + H5_CHUNKS[1], shape[1])),
                           slice(x, min(x + H5_CHUNKS[2], shape[2])))
                    fl = pool[rng.integers(len(pool))] + rng.uniform(110, 150)
                    blk = np.clip(np.rint(fl), 30, 230).astype(np.uint8)
                    ds[box] = blk[tuple(slice(0, s.stop - s.start) for s in box)]


def write_config(path: Path, name: str, h5: Path, block=BLOCK) -> None:
    import yaml

    cfg = {"datasets": {name: {"raw": {"source": str(h5), "key": "raw"},
                               "voxel_size": [40, 8, 8], "roles": ["pretrain"]}},
           "download": {"block": [int(b) for b in block]}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def run_child(cfg: Path, name: str, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg), name, str(out),
                           str(Path(__file__).parent)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"download child for {name} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    res = json.loads(lines[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"tokenunify download {name} returned {res['rc']}:\n{proc.stderr}")
    res["wall_s"] = wall
    return res


def same_as_source(h5: Path, out: Path) -> bool:
    """The output ``raw`` equals the HDF5 source everywhere (compared block by block)."""
    import h5py
    import zarr

    arr = zarr.open_group(str(out), mode="r")["raw"]
    with h5py.File(h5, "r") as f:
        ds = f["raw"]
        if tuple(arr.shape) != tuple(ds.shape) or arr.dtype != np.uint8:
            return False
        for z in range(0, ds.shape[0], BLOCK[0]):
            for y in range(0, ds.shape[1], 4 * BLOCK[1]):
                box = (slice(z, z + BLOCK[0]), slice(y, y + 4 * BLOCK[1]), slice(None))
                if not np.array_equal(arr[box], ds[box]):
                    return False
    return list(arr.attrs["voxel_size"]) == [40.0, 8.0, 8.0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"),
                   help="shape of the small volume (voxels)")
    p.add_argument("--factor", type=int, default=2,
                   help="per-axis growth of the big volume (2 -> 8x the voxels)")
    p.add_argument("--block", type=int, nargs=3, default=list(BLOCK), metavar=("Z", "Y", "X"),
                   help="download.block (voxels per block and zarr chunk)")
    p.add_argument("--max-ratio", type=float, default=1.2)
    p.add_argument("--quick", action="store_true", help="32x512x512 vs 64x1024x1024")
    args = p.parse_args(argv)
    if args.quick:
        args.base = [32, 512, 512]
    sizes = {"small": tuple(args.base), "big": tuple(n * args.factor for n in args.base)}

    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        tmp = Path(tmp)
        for name, shape in sizes.items():
            h5, cfg, out = tmp / f"{name}.h5", tmp / f"{name}.yaml", tmp / f"{name}.zarr"
            write_h5(h5, shape, seed=len(res))
            write_config(cfg, name, h5, args.block)
            r = run_child(cfg, name, out)
            r["equal"] = same_as_source(h5, out)
            r["mib"] = np.prod(shape) / 2**20
            res[name] = r
            print(f"  {name}: {list(shape)} = {r['mib']:.0f} MiB: peak RSS "
                  f"{r['peak_kib'] / 1024:.1f} MiB (after imports {r['import_kib'] / 1024:.1f} "
                  f"MiB, stage adds {(r['peak_kib'] - r['import_kib']) / 1024:.1f} MiB), "
                  f"{r['wall_s']:.1f} s, output equals input: {r['equal']}", flush=True)

    s, b = res["small"], res["big"]
    ratio = b["peak_kib"] / s["peak_kib"]
    equal = s["equal"] and b["equal"]
    ok = ratio <= args.max_ratio and equal
    print(f"SUMMARY bench_download_memory: peak RSS small {s['peak_kib'] / 1024:.1f} MiB "
          f"({s['mib']:.0f} MiB volume), big {b['peak_kib'] / 1024:.1f} MiB "
          f"({b['mib']:.0f} MiB volume, {b['mib'] / s['mib']:.0f}x); ratio big/small {ratio:.3f} "
          f"(need <= {args.max_ratio:g}); outputs equal inputs: {equal} -> "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
