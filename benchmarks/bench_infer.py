"""Blockwise inference: orchestration overhead, redundant windows, memory, workers, throughput.

On a synthetic EM volume (``--shape``, default 32 x 256 x 256, uint8 on disk) with a random
``tiny`` EMmamba (3 affinity channels; the weights do not change the cost), printed from one
run:

1. overhead: ``inference.run`` wall time over the bare forward of the global grid's windows
   (each window read, normalised and forwarded once, in batches of ``batch_size``), at the
   default block size and two others, ``--repeat`` times with the bare forward and the runs
   alternated (the median ratio and its range; each ratio against the bare forward of the same
   repetition); and the redundancy: window forwards done by the run over the windows of the
   grid (1.0 = no window predicted twice);
2. memory: peak RSS of the whole run (one process: one local worker runs threads) at the
   volume and at 8x the volume (2x per axis), the same block size and blocks in flight: blocks
   of half the default per axis, so that the smaller volume has 8 blocks and both runs keep
   ``threads_per_worker`` blocks in flight (with the default block the smaller volume is one
   block, and the comparison would be 1 block in flight against 2);
3. workers: 2 Dask worker processes against 1 on the same volume and blocks (wall-time
   ratio);
4. throughput: finished voxels per second for ``tiny`` and (``--base``) ``base``, against the
   floor set by the network's forward FLOPs per window (torch's FlopCounterMode) at the
   machine's measured float32 matmul rate.

Absolute times on shared machines are noise; the ratios are measured side by side.

    .venv/bin/python benchmarks/bench_infer.py [--shape 32 256 256] [--base]
    .venv/bin/python benchmarks/bench_infer.py --parts rss     # one part only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from peak_rss import peak_rss_gb

from tokenunify import inference
from tokenunify.data.synthetic import generate
from tokenunify.inference import InferConfig, gaussian_weight, read_padded, window_starts
from tokenunify.io.zarrio import create_volume
from tokenunify.model import checkpoint as ckpt
from tokenunify.model.emmamba import EMmamba, preset
from tokenunify.model.inputs import normalize_windows
from tokenunify.settings import from_section


def make_volume(path: Path, shape) -> Path:
    raw = generate(tuple(shape), seed=0)["raw"]
    g = zarr.open_group(str(path), mode="w")
    create_volume(g, "raw", shape, (32, 256, 256), np.uint8, (40, 8, 8), (0, 0, 0))[:] = raw
    return path


def make_checkpoint(path: Path, name: str) -> Path:
    torch.manual_seed(0)
    net = EMmamba(preset(name, out_channels=3))
    ckpt.save({"model": net.state_dict(), "model_config": net.config.to_dict()}, path)
    return path


def grid(shape, cfg: InferConfig) -> list[tuple[int, int, int]]:
    step = [w - o for w, o in zip(cfg.window, cfg.overlap, strict=True)]
    per_axis = [window_starts(n, w, s) for n, w, s in zip(shape, cfg.window, step, strict=True)]
    return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]


def warm(checkpoint: Path, cfg: InferConfig) -> None:
    """Load the model and run one batch (kernel builds, allocator), outside any timing, in a
    thread that ends before the timing starts.

    Not in the calling thread: torch's OpenMP gives every thread that runs a parallel region a
    team of its own, which outlives the region. A team left idle in the main thread while a
    worker thread computes puts more OpenMP threads in the process than there are cores, and
    libgomp then stops spinning at its barriers and sleeps in the kernel: 27 000 context
    switches instead of 2 000, and the same forward pass 7-15 % slower (measured by hand on
    this machine). A run never computes in the main thread, so a warm-up there measured the
    benchmark, not the run. Both the bare forward and the run compute in a fresh thread."""
    from concurrent.futures import ThreadPoolExecutor

    def _warm():
        torch.set_num_threads(cfg.threads)
        with torch.no_grad():
            inference.load_model(checkpoint)(torch.zeros(cfg.batch_size, 1, *cfg.window))

    with ThreadPoolExecutor(1) as pool:
        pool.submit(_warm).result()


def bare_forward(volume: Path, checkpoint: Path, cfg: InferConfig, out: Path) -> dict:
    """Every window of the global grid read, normalised, forwarded and blended into a
    full-volume accumulator once, with the run's torch threads, after a warm-up: wall seconds
    and windows (``out`` unused: the signature of :func:`one_run`). It computes in a worker
    thread, as the run's block tasks do (Dask threads): on this machine a forward pass in the
    main thread ran ~4x slower than in a worker thread with the same torch thread count while
    another job held the cores, which would flatter the run."""
    from concurrent.futures import ThreadPoolExecutor

    warm(checkpoint, cfg)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_bare_forward, volume, checkpoint, cfg).result()


def _bare_forward(volume: Path, checkpoint: Path, cfg: InferConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    raw = zarr.open_group(str(volume), mode="r")["raw"]
    model = inference.load_model(checkpoint)
    wins = grid(raw.shape, cfg)
    weight = gaussian_weight(cfg.window, cfg.sigma_scale)
    acc = np.zeros((3, *raw.shape), np.float32)
    t0 = time.perf_counter()
    n = cfg.batch_size
    for i in range(0, len(wins), n):
        chunk = wins[i:i + n]
        batch = normalize_windows(np.stack([read_padded(raw, s, cfg.window) for s in chunk]))
        with torch.no_grad():
            pred = torch.sigmoid(model(torch.from_numpy(batch[:, None]))).numpy()
        for s, p in zip(chunk, pred, strict=True):
            box = tuple(slice(a, min(a + w, m)) for a, w, m in
                        zip(s, cfg.window, raw.shape, strict=True))
            sub = tuple(slice(0, b.stop - b.start) for b in box)
            acc[(slice(None),) + box] += p[(slice(None),) + sub] * weight[sub]
    return {"s": time.perf_counter() - t0, "windows": len(wins)}


def one_run(volume: Path, checkpoint: Path, cfg: InferConfig, out: Path) -> dict:
    """``inference.run`` in this process, after a warm-up (with one worker the model is loaded
    once per process and reused by the run): wall seconds, window forwards, peak RSS (MB)."""
    warm(checkpoint, cfg)
    before = inference.FORWARDS["windows"]
    t0 = time.perf_counter()
    inference.run(volume, checkpoint, out, cfg)
    return {"s": time.perf_counter() - t0, "forwards": inference.FORWARDS["windows"] - before,
            "rss_mb": peak_rss_gb() * 1024}


def run_in_child(volume: Path, checkpoint: Path, cfg: InferConfig, out: Path,
                 what: str = "one_run") -> dict:
    """:func:`one_run` (or ``what``: :func:`bare_forward`) in a fresh process: its own peak RSS
    and model cache, and the same start for every measurement."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_infer as b; from tokenunify.inference import InferConfig; "
            f"from pathlib import Path; cfg = InferConfig(**json.loads(sys.argv[1])); "
            f"print(json.dumps(b.{what}(Path(sys.argv[2]), Path(sys.argv[3]), cfg, "
            f"Path(sys.argv[4]))))")
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dask"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(fields), str(volume),
                           str(checkpoint), str(out)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_rate(threads: int) -> float:
    """Float32 matmul rate of this CPU with ``threads`` torch threads (FLOP/s, best of 5)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * 1024**3 / best


def window_flops(checkpoint: Path, cfg: InferConfig) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = inference.load_model(checkpoint)
    x = torch.zeros(1, 1, *cfg.window)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


PARTS = ["overhead", "rss", "workers", "throughput"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 256, 256))
    ap.add_argument("--base", action="store_true", help="also the base model's throughput")
    ap.add_argument("--repeat", type=int, default=3,
                    help="overhead: repetitions of the bare forward and the runs (alternated)")
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                    help="which measurements (default: all)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    shape = tuple(args.shape)
    default = from_section(InferConfig, {"batch_blocks": None}, "infer")
    vol = make_volume(tmp / "vol.zarr", shape)
    tiny = make_checkpoint(tmp / "tiny.pt", "tiny")
    cfg = dataclasses.replace(default, workers=1)
    b0 = cfg.block
    if "overhead" not in args.parts:
        return rest(args, tmp, shape, vol, tiny, cfg, None)
    blocks = [b0, (b0[0], b0[1] // 2, b0[2] // 2), (b0[0] // 2, b0[1] // 2, b0[2] // 2)]
    bares, runs = [], {i: [] for i in range(len(blocks))}
    for rep in range(args.repeat):  # bare forward and runs alternated: load drifts hit both
        bare = run_in_child(vol, tiny, cfg, tmp / "unused", "bare_forward")
        bares.append(bare["s"])
        for i, block in enumerate(blocks):
            c = dataclasses.replace(cfg, block=tuple(int(b) for b in block))
            runs[i].append(run_in_child(vol, tiny, c, tmp / f"aff_{rep}_{i}.zarr"))
        print(f"repetition {rep + 1}/{args.repeat}: bare {bare['s']:.1f} s, runs "
              + ", ".join(f"{runs[i][-1]['s']:.1f}" for i in runs) + " s", flush=True)
    n_windows = bare["windows"]
    print(f"volume {list(shape)}, window {list(cfg.window)}, overlap {list(cfg.overlap)}: "
          f"{n_windows} windows in the grid; bare forward {np.median(bares):.1f} s (median "
          f"of {args.repeat})")
    print("\n| block | run s (median) | overhead: median (min-max) over repetitions | "
          "window forwards | redundancy |")
    print("|---|---|---|---|---|")
    for i, block in enumerate(blocks):
        ratios = [r["s"] / b for r, b in zip(runs[i], bares, strict=True)]
        forwards = runs[i][0]["forwards"]
        print(f"| {list(block)} | {np.median([r['s'] for r in runs[i]]):.1f} | "
              f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {forwards} | "
              f"{forwards / n_windows:.2f} |", flush=True)
    return rest(args, tmp, shape, vol, tiny, cfg, runs[0][0])


def rest(args, tmp: Path, shape, vol: Path, tiny: Path, cfg: InferConfig, timed) -> int:
    """Parts 2-4 (``timed``: a run of ``cfg`` on ``vol`` from part 1, or None)."""
    if "rss" in args.parts:
        big = tuple(2 * n for n in shape)
        vol8 = make_volume(tmp / "vol8.zarr", big)
        half = dataclasses.replace(cfg, block=tuple(max(1, b // 2) for b in cfg.block))
        small_r = run_in_child(vol, tiny, half, tmp / "rss_1.zarr")
        big_r = run_in_child(vol8, tiny, half, tmp / "rss_8.zarr")
        n_small = np.prod([-(-n // b) for n, b in zip(shape, half.block, strict=True)])
        print(f"\npeak RSS, whole run, block {list(half.block)}, {half.threads_per_worker} "
              f"blocks in flight: {small_r['rss_mb']:.0f} MB at {list(shape)} ({n_small} "
              f"blocks), {big_r['rss_mb']:.0f} MB at {list(big)} ({8 * n_small} blocks, 8x "
              f"the voxels): {100 * (big_r['rss_mb'] / small_r['rss_mb'] - 1):+.0f} %",
              flush=True)
    if "workers" in args.parts:
        workers(tmp, vol, tiny, cfg)
    if "throughput" in args.parts:
        throughput(args, tmp, shape, vol, tiny, cfg, timed)
    return 0


def workers(tmp: Path, vol: Path, tiny: Path, cfg: InferConfig) -> None:
    """2 worker processes against 1, each with 1 torch thread and ``threads_per_worker`` blocks
    in flight, on blocks of half the default per axis (8 blocks on the default volume: with
    the default block the volume is one block, and a second worker would have nothing to do).
    The times include what a second worker costs: its process start, imports and model load."""
    half = dataclasses.replace(cfg, block=tuple(max(1, b // 2) for b in cfg.block), threads=1)
    two = run_in_child(vol, tiny, dataclasses.replace(half, workers=2), tmp / "w2.zarr")
    one = run_in_child(vol, tiny, dataclasses.replace(half, workers=1), tmp / "w1.zarr")
    print(f"workers, block {list(half.block)}, 1 torch thread each, {half.threads_per_worker} "
          f"blocks in flight per worker: 2 workers {two['s']:.1f} s, 1 worker {one['s']:.1f} s: "
          f"2 workers take {two['s'] / one['s']:.2f}x the time of 1", flush=True)


def throughput(args, tmp: Path, shape, vol: Path, tiny: Path, cfg: InferConfig, timed) -> None:
    rate = matmul_rate(cfg.threads)
    print(f"\nfloat32 matmul, {cfg.threads} threads: {rate / 1e9:.1f} GFLOP/s")
    print("| model | window GFLOP | floor Mvox/s | measured Mvox/s | measured / floor |")
    print("|---|---|---|---|---|")
    models = [("tiny", tiny, timed or run_in_child(vol, tiny, cfg, tmp / "tiny.zarr"))]
    if args.base:
        base = make_checkpoint(tmp / "base.pt", "base")
        models.append(("base", base, run_in_child(vol, base, cfg, tmp / "base.zarr")))
    step = np.prod([w - o for w, o in zip(cfg.window, cfg.overlap, strict=True)])
    for name, path, r in models:
        flops = window_flops(path, cfg)
        floor = rate / (flops / step)  # voxels/s if every FLOP ran at the matmul rate
        measured = np.prod(shape) / r["s"]
        print(f"| {name} | {flops / 1e9:.2f} | {floor / 1e6:.2f} | {measured / 1e6:.3f} | "
              f"{measured / floor:.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
