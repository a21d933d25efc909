"""Blockwise affinity prediction with Dask: seam-free, block-size invariant, resumable.

Geometry (all in voxels, z y x)::

    volume ─┬─ blocks (``block``): one Dask task each; the output is written only inside the
            │  block's core, in zarr chunks equal to the block, so no two tasks share a chunk
            └─ windows (``window``, the model input) on ONE global grid with step
               ``window - overlap``, anchored at the volume origin; the last window of each
               axis is moved back to end at the volume's face, so no window reads outside
               the volume (an axis shorter than the window is mirrored, never zero-padded:
               zeros standardised with the window would show the network an input it never
               saw in training and spoil the predictions along the far faces)

Each window of the global grid is predicted once, by the block that holds its start (it
*owns* the window). Pass 1: a block forwards its owned windows and adds prediction x weight
and the weight (a Gaussian, sigma = ``sigma_scale`` x window) over the region they cover, its
core and up to ``window - 1`` voxels past its far faces, as fixed-point integers
(int64, :func:`sum_scale`) into one of the staging sums arrays (``.sums/pZYX``, chosen by the block's
position modulo the number of blocks a window can reach, so no two blocks ever write one
chunk). Pass 2: a block adds up its core in every sums array and divides. Integer sums do not
depend on their order, so the affinities of a voxel are the same whatever the block size, bit
for bit; every forward pass has ``batch_size`` windows (the last batch of a block padded with
zero windows) and every block task computes with ``threads`` torch threads (the network's
float results depend on both), whatever the Dask workers or snakemake --cores. Against the
former scheme (every block predicting every window that touches its core and blending in
float32), the affinities agree to float rounding (``tests/test_inference.py`` counts the
uint8 values that differ), and the windows forwarded drop from up to 2.6x the grid to 1x
(``benchmarks/bench_infer.py``).

Output ``affinities.zarr`` (array ``affinities``): (3, Z, Y, X), channel order z, y, x, offsets
(-1,0,0), (0,-1,0), (0,0,-1) (see :mod:`tokenunify.affinities`), dtype uint8 (value x 255,
rounded) or float16; attributes voxel_size, offset, axis_names, units, scale, provenance.

Resume: each block leaves a done marker in ``affinities.zarr.partial`` after each pass; a rerun
after a crash predicts only the windows of blocks without a pass-1 marker, and the folder is
renamed into place (the sums removed) when every block has passed both.
The model is loaded once per Dask worker process, not once per block.

Cluster and batches (:mod:`tokenunify.cluster`): the Dask tasks run locally, on an existing
scheduler or on a dask-jobqueue SLURMCluster (``dask``); ``run(..., batch=i)`` predicts only
batch i of ``batch_blocks`` blocks into the shared staging folder (one Snakemake job per batch)
and the call without ``batch`` does the rest of pass 1, then pass 2, and renames the result
into place.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from tokenunify.affinities import OFFSETS
from tokenunify.cluster import DaskConfig, batch_of, dask_client
from tokenunify.heap import block_task
from tokenunify.io.identity import Lineage, result_settings
from tokenunify.io.locks import exclusive
from tokenunify.io.zarrio import (
    StagedOutput,
    blocks,
    create_volume,
    mark_done,
    provenance,
    require_complete,
    writable,
)
from tokenunify.model.inputs import normalize_windows
from tokenunify.settings import defaults, from_section

log = logging.getLogger(__name__)

N_AFFINITIES = len(OFFSETS)  # channels written: the nearest-neighbour affinities only


_DEFAULTS = defaults("infer")


@dataclass(frozen=True)
class InferConfig:
    """Blockwise inference settings (voxels, z y x)."""

    block: tuple[int, int, int] = _DEFAULTS["block"]
    window: tuple[int, int, int] = _DEFAULTS["window"]
    overlap: tuple[int, int, int] = _DEFAULTS["overlap"]
    sigma_scale: float = _DEFAULTS["sigma_scale"]
    batch_size: int = _DEFAULTS["batch_size"]
    tta: bool = _DEFAULTS["tta"]  # average over the 8 flips of z, y, x
    dtype: str = _DEFAULTS["dtype"]  # uint8 (x 255) or float16
    workers: int = _DEFAULTS["workers"]  # local Dask worker processes
    threads_per_worker: int = 2  # Dask threads per worker: blocks at once (results unchanged)
    threads: int = _DEFAULTS["threads"]  # torch threads of each block task (the affinities depend on it)
    dask: DaskConfig = field(default_factory=DaskConfig)  # local, address or slurm
    batch_blocks: int | None = _DEFAULTS["batch_blocks"]  # blocks per Snakemake job (None: one job)

    def __post_init__(self):
        if not isinstance(self.dask, DaskConfig):
            object.__setattr__(self, "dask", from_section(DaskConfig, self.dask, ("infer", "dask")))
        for w, o in zip(self.window, self.overlap, strict=True):
            if not 0 <= o < w:
                raise ValueError(f"infer.overlap {self.overlap} must be >= 0 and < window "
                                 f"{self.window}")


GRID = "face-aligned"  # the window grid below (before: "zero-padded"); part of the lineage
BLEND = "owned-windows-int64-exact"  # how windows are blended (before: int64 sums added in
# float64, which rounded past 2^53; before that, float32 per block); part of the lineage
SUMS = ".sums"  # the staging group of the pass-1 sums (removed before the commit)
SUM_BITS = 63  # sums are int64; each term is scaled to use them without overflow


def window_starts(n: int, window: int, step: int) -> np.ndarray:
    """Starts of the global window grid along one axis covering [0, n); the grid is anchored at
    0 with the given step, and when the grid stops short of n one more window is added that
    ends exactly at n (so windows stay inside the volume). An axis shorter than the window has
    one window at 0, which reads a mirrored volume (:func:`read_padded`)."""
    starts = np.arange(0, max(n - window, 0) + 1, step)
    if starts[-1] + window < n:
        starts = np.append(starts, n - window)
    return starts


def gaussian_weight(window, sigma_scale: float) -> np.ndarray:
    """Separable Gaussian blending weight over a window, peak 1, floor 1e-3."""
    w = np.ones(window, np.float32)
    for ax, n in enumerate(window):
        c = (n - 1) / 2
        g = np.exp(-0.5 * ((np.arange(n) - c) / max(sigma_scale * n, 1e-6)) ** 2)
        shape = [1, 1, 1]
        shape[ax] = n
        w = w * g.reshape(shape).astype(np.float32)
    return np.maximum(w, 1e-3)


def read_padded(arr, start, size) -> np.ndarray:
    """arr[start:start+size], mirrored (numpy's ``reflect``) where the box leaves the volume.

    The window grid keeps windows inside the volume wherever it is at least a window long, so
    this pads only along axes shorter than the window (and for boxes that start outside)."""
    src = tuple(slice(min(max(s, 0), d - 1), max(min(s + n, d), min(max(s, 0), d - 1) + 1))
                for s, n, d in zip(start, size, arr.shape, strict=True))
    data = np.asarray(arr[src])
    pad = [(sl.start - s, s + n - sl.stop) for sl, s, n in zip(src, start, size, strict=True)]
    if not any(a or b for a, b in pad):
        return data
    if any(a < 0 or b < 0 for a, b in pad):
        raise ValueError(f"box {list(start)}+{list(size)} does not overlap shape {arr.shape}")
    return np.pad(data, pad, mode="reflect")


def _worker_device() -> torch.device:
    """CPU, or on GPU machines one GPU per Dask worker: worker i of a LocalCluster (named 0, 1,
    ...) takes GPU i modulo the GPU count; outside a worker, GPU 0."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = 0
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        pass
    return torch.device("cuda", index % torch.cuda.device_count())


_MODELS: dict[str, torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()
LOADS = {"count": 0}  # checkpoint loads in this process (the model is loaded once per worker)
# windows forwarded in this process (benchmarks/bench_infer.py: redundancy = this / grid windows)
FORWARDS = {"windows": 0}


def load_model(checkpoint: str | Path) -> torch.nn.Module:
    """The EMmamba of a checkpoint, loaded once per process (cached), in eval mode."""
    from tokenunify.model import checkpoint as ckpt
    from tokenunify.model.emmamba import EMmamba, ModelConfig

    key = str(Path(checkpoint).resolve())
    with _MODELS_LOCK:
        if key not in _MODELS:
            state = ckpt.load(checkpoint)
            model = EMmamba(ModelConfig.from_dict(state["model_config"]))
            model.load_state_dict(state["model"])
            model.eval()
            device = _worker_device()
            _MODELS[key] = model.to(device)
            LOADS["count"] += 1
            log.info("loaded %s on %s", checkpoint, device)
        return _MODELS[key]


def _predict(model, batch: np.ndarray, tta: bool) -> np.ndarray:
    """Sigmoid nearest-neighbour affinities (n, 3, *window) of normalised windows (n, *window).

    Only the channels of :data:`~tokenunify.affinities.OFFSETS` are kept: a model fine-tuned
    with ``long_range`` offsets has more channels after them, a training target only.

    ``tta``: the mean over the 8 flips of z, y, x. Each flipped input is predicted and flipped
    back; then the channel of every flipped axis moves one voxel along that axis. In the flipped
    frame a voxel's affinity links it to the voxel before it, which in the original frame is the
    voxel after it, a link stored one voxel further on (at the voxel it points from); without
    the move the flipped predictions put every boundary one voxel early. The first plane of
    such a channel, whose link reaches outside the window, keeps the unmoved value."""
    device = next(model.parameters()).device
    x = torch.from_numpy(batch[:, None]).to(device)
    flips = list(itertools.product([False, True], repeat=3)) if tta else [(False,) * 3]
    acc = None
    with torch.no_grad():
        for f in flips:
            dims = [2 + i for i, on in enumerate(f) if on]
            xi = x.flip(dims) if dims else x
            p = torch.sigmoid(model(xi))[:, :N_AFFINITIES]
            if dims:
                p = p.flip(dims)
                chans = []
                for c in range(N_AFFINITIES):
                    q = p[:, c]
                    if f[c]:  # channel c links along axis c (OFFSETS), dim c + 1 of q
                        n = q.shape[c + 1]
                        q = torch.cat([q.narrow(c + 1, 0, 1), q.narrow(c + 1, 0, n - 1)],
                                      dim=c + 1)
                    chans.append(q)
                p = torch.stack(chans, dim=1)
            acc = p if acc is None else acc + p
    return (acc / len(flips)).float().cpu().numpy()


def _forward(raw, model, starts: list, cfg: InferConfig):
    """Yield (start, prediction (C, *window)) of the windows at ``starts``, ``batch_size`` at
    a time. Every forward pass has ``batch_size`` windows (the last one padded with zero
    windows, whose outputs are dropped): kernels may round differently for another batch
    size, and which windows share a batch depends on the blocking."""
    n = cfg.batch_size
    for i in range(0, len(starts), n):
        chunk = starts[i:i + n]
        batch = normalize_windows(np.stack([read_padded(raw, s, cfg.window) for s in chunk]))
        batch = np.concatenate([batch, np.zeros((n - len(chunk), *batch.shape[1:]), batch.dtype)])
        preds = _predict(model, batch, cfg.tta)[:len(chunk)]
        FORWARDS["windows"] += len(chunk)
        yield from zip(chunk, preds, strict=True)


def predict_block(raw, checkpoint, core: tuple[slice, slice, slice], cfg: InferConfig,
                  ) -> np.ndarray:
    """Blended affinities (C, *core shape) float32 of one block core.

    ``checkpoint`` is a checkpoint path (loaded once per process) or a model in memory."""
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else load_model(checkpoint)
    step = tuple(w - o for w, o in zip(cfg.window, cfg.overlap, strict=True))
    weight = gaussian_weight(cfg.window, cfg.sigma_scale)
    lo = np.array([s.start for s in core])
    hi = np.array([s.stop for s in core])
    per_axis = []
    for ax in range(3):
        st = window_starts(raw.shape[ax], cfg.window[ax], step[ax])
        per_axis.append(st[(st < hi[ax]) & (st + cfg.window[ax] > lo[ax])])
    wins = list(itertools.product(*per_axis))
    out_ch = N_AFFINITIES
    acc = np.zeros((out_ch, *(hi - lo)), np.float32)
    wsum = np.zeros(tuple(hi - lo), np.float32)
    for s, p in _forward(raw, model, wins, cfg):
        a = np.maximum(np.array(s), lo)
        b = np.minimum(np.array(s) + cfg.window, hi)
        src = tuple(slice(x - y, z - y) for x, y, z in zip(a, s, b, strict=True))
        dst = tuple(slice(x - y, z - y) for x, y, z in zip(a, lo, b, strict=True))
        acc[(slice(None),) + dst] += p[(slice(None),) + src] * weight[src]
        wsum[dst] += weight[src]
    return acc / wsum


def _grid(shape, cfg: InferConfig) -> list[np.ndarray]:
    """The global window starts along each axis."""
    return [window_starts(n, w, w - o) for n, w, o in
            zip(shape, cfg.window, cfg.overlap, strict=True)]


def sum_scale(shape, cfg: InferConfig) -> float:
    """The fixed-point scale of the pass-1 sums: a power of two such that the weight sum of
    the most windows that cover one voxel (weights <= 1) stays below 2^63 (a term's rounding,
    2^-53 or less of the largest weight, is below float64's: the integer sums lose nothing
    that float arithmetic would keep)."""
    most = 1
    for st, w in zip(_grid(shape, cfg), cfg.window, strict=True):
        ends = st + w
        most *= int(max(((st <= x) & (ends > x)).sum() for x in np.unique(np.r_[st, ends - 1])))
    return float(2 ** (SUM_BITS - 1 - int(np.ceil(np.log2(most + 1)))))


def reach(block, cfg: InferConfig) -> tuple[int, ...]:
    """Per axis, how many blocks a block's owned windows cover (its own and the next ones):
    the number of sums arrays along that axis."""
    return tuple(1 + -(-(w - 1) // b) for w, b in zip(cfg.window, block, strict=True))


def sums_name(lo, block, cfg: InferConfig) -> str:
    """The sums array a block (core starting at ``lo``) writes: its position modulo
    :func:`reach`, so two blocks that write one array are too far apart to share a chunk."""
    return "p" + "".join(str((a // b) % k) for a, b, k in
                         zip(lo, block, reach(block, cfg), strict=True))


def owned_sums(raw, checkpoint, core: tuple[slice, slice, slice], cfg: InferConfig,
               scale: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pass 1 of one block: prediction x weight and weight (C + 1, *region) int64 of the
    windows it owns (those starting in ``core``), over ``region``, the part of the volume they
    cover (the core and up to window - 1 voxels past its far faces)."""
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else load_model(checkpoint)
    weight = gaussian_weight(cfg.window, cfg.sigma_scale).astype(np.float64)
    lo = np.array([c.start for c in core])
    hi = np.array([c.stop for c in core])
    per_axis = [st[(st >= a) & (st < b)] for st, a, b in zip(_grid(raw.shape, cfg), lo, hi,
                                                              strict=True)]
    wins = list(itertools.product(*per_axis))
    end = hi if not wins else np.maximum(hi, np.minimum(
        np.max(np.array(wins) + np.asarray(cfg.window), axis=0), raw.shape))
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, end, strict=True))
    out_ch = N_AFFINITIES
    acc = np.zeros((out_ch + 1, *(end - lo)), np.int64)
    # scale is a power of two: p * (w * scale) == p * w * scale exactly, so the terms are those
    # of a per-window product; each is rounded to an integer and converted to int64 (exact:
    # integral and below 2^63) before it is added, and the adds are int64 adds, so the sums are
    # exact, whatever the order or the blocks that add them. (Adding the float64 term into the
    # int64 array directly would add in float64, which rounds once the sums pass 2^53.)
    wscaled = weight * scale
    wterm = np.rint(wscaled).astype(np.int64)
    term = np.empty((out_ch, *cfg.window), np.float64)
    iterm = np.empty((out_ch, *cfg.window), np.int64)
    for st, p in _forward(raw, model, wins, cfg):
        b = np.minimum(np.array(st) + cfg.window, raw.shape)
        src = tuple(slice(0, int(y - x)) for x, y in zip(st, b, strict=True))
        dst = tuple(slice(int(x - a), int(y - a)) for x, y, a in zip(st, b, lo, strict=True))
        t, it = term[(slice(None),) + src], iterm[(slice(None),) + src]
        np.multiply(p[(slice(None),) + src], wscaled[src], out=t)
        np.rint(t, out=t)
        np.copyto(it, t, casting="unsafe")
        part = acc[(slice(0, out_ch),) + dst]
        part += it
        acc[(out_ch,) + dst] += wterm[src]
    return acc, region


def blend_sums(sums) -> np.ndarray:
    """Pass 2 of one block: the affinities (C, *core) float32 from the (C + 1, *core) sums of
    every sums array over the block's core (an iterable: added one at a time, so memory holds
    two of them, not all)."""
    total = None
    for part in sums:
        total = np.asarray(part, np.int64) if total is None else np.add(total, part, out=total)
    # channel by channel, as total[:-1] / total[-1:] (both to float64, divided, then float32)
    # without its (C, *core) float64 temporary
    weight = total[-1].astype(np.float64)
    out = np.empty(total[:-1].shape, np.float32)
    buf = np.empty(weight.shape, np.float64)
    for c in range(len(out)):
        np.divide(total[c], weight, out=buf)
        out[c] = buf
    return out


def _encode(aff: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(np.rint(aff * 255.0), 0, 255).astype(np.uint8)
    return aff.astype(np.float16)


@block_task
def _sums_task(raw_path: str, out_path: str, checkpoint: str, idx, core, cfg: InferConfig,
               block, scale: float) -> float:
    """Pass 1 of one block into the staging folder ``out_path``, then its 'owned' marker."""
    t0 = time.perf_counter()
    # the same torch thread count wherever the task runs (a Dask nanny sets OMP_NUM_THREADS=1),
    # from the config only (not from snakemake --cores or the Dask threads): the network's
    # float results depend on it
    torch.set_num_threads(cfg.threads)
    raw = zarr.open_group(raw_path, mode="r")["raw"]
    lo = [c.start for c in core]
    arr = writable(zarr.open_group(out_path, mode="r+")[f"{SUMS}/{sums_name(lo, block, cfg)}"])
    acc, region = owned_sums(raw, checkpoint, core, cfg, scale)
    arr[(slice(None),) + region] = acc
    mark_done(out_path, "owned", idx)  # only after the sums are fully written
    dt = time.perf_counter() - t0
    log.info("block %s %s: windows in %.2f s", idx, [(c.start, c.stop) for c in core], dt)
    return dt


@block_task
def _whole_task(raw_path: str, out_path: str, checkpoint: str, idx, core, cfg: InferConfig,
                scale: float) -> float:
    """Both passes of a volume that is one block, its sums kept in memory instead of a staging
    array (about 0.9 s less on a 2-Mvoxel volume, ``benchmarks/bench_infer.py``): the same
    integer sums divided the same way, so the affinities are those of any other blocking, bit
    for bit (``tests/test_inference.py``)."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)  # as in _sums_task: from the config only
    raw = zarr.open_group(raw_path, mode="r")["raw"]
    acc, region = owned_sums(raw, checkpoint, core, cfg, scale)
    assert region == tuple(core), (region, core)  # one block: the windows end at its faces
    out = writable(zarr.open_group(out_path, mode="r+")["affinities"])
    out[(slice(None),) + tuple(core)] = _encode(blend_sums([acc]), cfg.dtype)
    mark_done(out_path, "owned", idx)
    mark_done(out_path, "block", idx)  # only after the chunk is fully written
    return time.perf_counter() - t0


@block_task
def _blend_task(out_path: str, idx, core, cfg: InferConfig) -> float:
    """Pass 2 of one block: its core's affinities from every sums array, then its marker."""
    t0 = time.perf_counter()
    root = zarr.open_group(out_path, mode="r+")
    sums = root[SUMS]
    parts = (np.asarray(arr[(slice(None),) + tuple(core)]) for _, arr in sorted(sums.arrays()))
    out = writable(root["affinities"])
    out[(slice(None),) + tuple(core)] = _encode(blend_sums(parts), cfg.dtype)
    mark_done(out_path, "block", idx)  # only after the chunk is fully written
    return time.perf_counter() - t0


def _run_in_threads(phases: list, threads: int) -> None:
    """:func:`_run_phases` in a pool of ``threads`` threads of this process: what a one-worker
    threaded LocalCluster does, without importing ``distributed`` (0.5 s in a profile of
    benchmarks/bench_infer.py's run) and starting a scheduler."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(threads, thread_name_prefix="infer") as pool:
        for fn, todo, lead, trail, total, name in phases:
            futures = [pool.submit(fn, *lead, i, b, *trail) for i, b in todo]
            with tqdm(total=total, initial=total - len(todo), desc=name, unit="block",
                      disable=None) as bar:
                for fut in as_completed(futures):
                    fut.result()
                    bar.update()


def _run_phases(phases: list, cfg: InferConfig, client=None) -> None:
    """Run each phase's tasks, phase after phase, on ``client``, or else on ``cfg.dask``'s
    cluster (a LocalCluster for 'local', or threads of this process for one local worker),
    started once for all phases. A phase is (function, todo, leading arguments, trailing
    arguments, total, name): one task ``function(*leading, index, core, *trailing)`` per
    (index, core) of todo."""
    phases = [p for p in phases if p[1]]
    if not phases:  # no cluster (and no worker jobs) when every block is done
        return
    if client is None and cfg.dask.cluster == "local" and cfg.workers == 1:
        _run_in_threads(phases, cfg.threads_per_worker)
        return
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    with dask_client(cfg.dask if client is None else DaskConfig(), len(phases[0][1]),
                     "infer") as started:
        own = client is None and started is None
        if own:
            client = Client(LocalCluster(n_workers=cfg.workers,
                                         threads_per_worker=cfg.threads_per_worker,
                                         processes=cfg.workers > 1, dashboard_address=None))
        elif client is None:
            client = started
        try:
            for fn, todo, lead, trail, total, name in phases:
                futures = [client.submit(fn, *lead, i, b, *trail, pure=False) for i, b in todo]
                with tqdm(total=total, initial=total - len(todo), desc=name, unit="block",
                          disable=None) as bar:
                    for fut in as_completed(futures):
                        fut.result()
                        bar.update()
        finally:
            if own:
                client.close()


def run(volume: str | Path, checkpoint: str | Path, out: str | Path,
        cfg: InferConfig = InferConfig(), client=None, batch: int | None = None) -> Path:
    """Predict affinities of ``volume``'s raw array into ``out`` (``affinities.zarr``).

    Args:
        volume: ``results/data/{dataset}.zarr`` (array ``raw``, uint8).
        checkpoint: fine-tuned checkpoint (EMmamba with 3 output channels).
        out: output folder.
        cfg: block, window, overlap (voxels), blending, TTA, dtype, Dask settings.
        client: an existing ``distributed.Client``; default: ``cfg.dask``'s cluster (a
            LocalCluster for ``local``) started and closed here.
        batch: predict only this batch of ``cfg.batch_blocks`` blocks into the staging folder
            and return its path; None: predict every missing block and commit ``out``.
    """
    from tokenunify.model import checkpoint as ckpt

    src = zarr.open_group(str(volume), mode="r")
    raw = src["raw"]
    require_complete(raw, "infer")
    state = ckpt.load(checkpoint)
    if state["model_config"]["out_channels"] < N_AFFINITIES:
        raise ValueError(f"{checkpoint}: the model has {state['model_config']['out_channels']} "
                         f"output channels, fewer than the {N_AFFINITIES} affinities (a "
                         "pretraining checkpoint? infer needs a fine-tuned one)")
    out_ch = N_AFFINITIES
    block = tuple(min(b, n) for b, n in zip(cfg.block, raw.shape, strict=True))
    # what changes the result (not where or in how many jobs it runs)
    settings = result_settings(cfg.__dict__)
    settings["grid"] = GRID  # a staging folder of another window grid is never resumed
    settings["blend"] = BLEND
    lineage = Lineage.of("infer", settings, {"volume": volume, "checkpoint": checkpoint})
    with exclusive(out):  # batch jobs of this stage may start together
        stage = StagedOutput(out, lineage)
        root = zarr.open_group(str(stage.path), mode="a", zarr_format=3)
        create_volume(root, "affinities", raw.shape, block, cfg.dtype, raw.attrs["voxel_size"],
                      raw.attrs["offset"], channels=out_ch,
                      attrs={"offsets": [list(o) for o in OFFSETS],
                             "channel_order": ["z", "y", "x"],
                             "scale": 255.0 if cfg.dtype == "uint8" else 1.0,
                             "provenance": provenance("infer", lineage,
                                                      [str(volume), str(checkpoint)]),
                             "window": list(cfg.window), "overlap": list(cfg.overlap),
                             "tta": cfg.tta})
        whole = block == tuple(raw.shape) and batch is None  # one block: no staging sums
        sums = root.require_group(SUMS)
        for name in {sums_name(b, block, cfg) for b in itertools.product(
                *(range(0, n, k) for n, k in zip(raw.shape, block, strict=True)))}:
            if name not in sums and not whole:
                sums.create_array(name, shape=(out_ch + 1, *raw.shape),
                                  chunks=(out_ch + 1, *block), dtype="int64", fill_value=0,
                                  config={"write_empty_chunks": False})
    scale = sum_scale(raw.shape, cfg)
    grid = list(blocks(raw.shape, block))
    mine = batch_of(grid, batch, cfg.batch_blocks)
    todo = [(i, b) for i, b in mine if not stage.is_done("owned", i)]
    what = "all blocks" if batch is None else f"batch {batch}"
    log.info("%s (%s): %d of %d blocks to predict", volume, what, len(todo), len(mine))
    phases = [(_sums_task, todo, (str(volume), str(stage.path), str(checkpoint)),
               (cfg, block, scale), len(mine), "infer")]
    if whole:
        todo = [(i, b) for i, b in grid if not stage.is_done("block", i)]
        phases = [(_whole_task, todo, (str(volume), str(stage.path), str(checkpoint)),
                   (cfg, scale), 1, "infer")]
    elif batch is None:  # the final call also blends every block
        blend = [(i, b) for i, b in grid if not stage.is_done("block", i)]
        log.info("%s: %d of %d blocks to blend", volume, len(blend), len(grid))
        phases.append((_blend_task, blend, (str(stage.path),), (cfg,), len(grid), "blend"))
    _run_phases(phases, cfg, client)
    if batch is not None:
        return stage.path
    shutil.rmtree(stage.path / SUMS, ignore_errors=True)
    return stage.commit()
