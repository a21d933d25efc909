"""Blockwise inference: block-size invariance, resume after a killed worker, edges, options."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from tokenunify import affinities, inference
from tokenunify.inference import InferConfig, gaussian_weight, window_starts
from tokenunify.io.zarrio import create_volume

CFG = InferConfig(block=(16, 96, 96), window=(16, 32, 32), overlap=(8, 16, 16), batch_size=4)


def test_window_grid_and_weight():
    # the last window ends at the volume's face instead of reading past it
    np.testing.assert_array_equal(window_starts(100, 32, 16), [0, 16, 32, 48, 64, 68])
    np.testing.assert_array_equal(window_starts(96, 32, 16), [0, 16, 32, 48, 64])
    np.testing.assert_array_equal(window_starts(20, 32, 16), [0])  # smaller than a window
    w = gaussian_weight((4, 8, 8), 0.125)
    assert w.max() <= 1 and w.min() >= 1e-3 and w[2, 4, 4] > w[0, 0, 0]


class _Echo(torch.nn.Module):
    """A stand-in network whose 3 output channels are its standardised input."""

    config = type("C", (), {"out_channels": 3})

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.repeat(1, 3, 1, 1, 1) + self.p


def test_windows_never_read_zeros_past_the_far_faces():
    """On a uniform volume every standardised window is 0, so the echo network predicts
    sigmoid(0) = 0.5 everywhere, also along the far faces of a volume that is no multiple of the
    window step (there, zero padding made windows whose input the network never saw in
    training: on NeuroProof it spoiled the last 10 z sections and 34 voxels of y and x). An axis
    shorter than the window reads the volume mirrored, which stays uniform too."""
    raw = np.full((21, 50, 47), 120, np.uint8)
    cfg = InferConfig(window=(16, 32, 32), overlap=(8, 16, 16), batch_size=2)
    for shape in ((21, 50, 47), (9, 50, 47)):
        core = tuple(slice(0, n) for n in shape)
        pred = inference.predict_block(raw[core], _Echo(), core, cfg)
        np.testing.assert_allclose(pred, 0.5, atol=1e-6, err_msg=str(shape))


class _Boundaries(torch.nn.Module):
    """A stand-in network that sees labels and predicts their affinities (logit +-10), for the
    nearest-neighbour offsets and then 3 long-range ones (a long_range fine-tuned model's
    channel order); a link reaching outside the window is predicted as 'same'."""

    OFFSETS = affinities.OFFSETS + ((-3, 0, 0), (0, -3, 0), (0, 0, -3))
    config = type("C", (), {"out_channels": 6})

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        lab = x[:, 0].numpy()
        out = np.stack([affinities.seg_to_affinities(v + 1, self.OFFSETS) for v in lab])
        return torch.from_numpy(20 * out - 10) + self.p


def test_tta_flips_put_each_boundary_where_the_plain_prediction_does(rng):
    """Flip TTA must give a network that predicts exact affinities the same affinities: a
    flipped axis' channel moves one voxel back after the flip (an affinity is stored at the
    voxel it points from). Only the 3 nearest-neighbour channels come out."""
    lab = np.repeat(np.repeat(rng.integers(0, 4, (2, 4, 4, 4)), 3, axis=2), 2, axis=3)
    batch = np.repeat(lab, 2, axis=1).astype(np.float32)  # (2, 8, 12, 8): blocks of labels
    plain = inference._predict(_Boundaries(), batch, tta=False)
    tta = inference._predict(_Boundaries(), batch, tta=True)
    assert plain.shape == tta.shape == (2, 3, 8, 12, 8)
    ref = np.stack([affinities.seg_to_affinities(v + 1) for v in batch])
    np.testing.assert_allclose(plain[:, :, 1:, 1:, 1:], ref[:, :, 1:, 1:, 1:], atol=1e-4)
    # the first plane of a channel's own axis has no neighbour in the window
    for c in range(3):
        inner = [slice(None), c] + [slice(None)] * 3
        inner[2 + c] = slice(1, None)
        np.testing.assert_allclose(tta[tuple(inner)], plain[tuple(inner)], atol=1e-4,
                                   err_msg=f"channel {c}")


def test_affinities_do_not_depend_on_the_block_size(infer_setup, tmp_path):
    """The key property: the stored affinities are bit-identical whatever the block size (one
    block; 2 x 2 blocks of [16, 64, 64] with 16, 8, 8, 4 windows; 8 blocks of 9 windows): every
    forward pass has batch_size windows, the last batch of a block padded with zero windows."""
    from distributed import Client, LocalCluster

    inference._MODELS.clear()
    loads = inference.LOADS["count"]
    stored = {}
    with Client(LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                             dashboard_address=None)) as client:
        for block in ((16, 96, 96), (16, 64, 64), (32, 128, 128), (8, 48, 48)):
            name = "x".join(map(str, block))
            out = inference.run(infer_setup / "v.zarr", infer_setup / "model.pt",
                                tmp_path / f"{name}.zarr",
                                dataclasses.replace(CFG, block=block, dtype="float16"),
                                client=client)
            stored[block] = zarr.open_group(str(out))["affinities"]
    assert inference.LOADS["count"] == loads + 1  # 15 blocks, one model load in the worker
    a = stored[(16, 96, 96)]
    assert a.shape == (3, 16, 96, 96) and stored[(8, 48, 48)].chunks == (3, 8, 48, 48)
    for block, b in stored.items():
        assert np.array_equal(a[:], b[:]), block
    assert a.attrs["voxel_size"] == [40.0, 8.0, 8.0] and a.attrs["channel_order"] == ["z", "y", "x"]
    assert 0 <= float(a[:].min()) and float(a[:].max()) <= 1


def test_each_window_forwarded_once_and_equal_to_the_float_blend(infer_setup, tmp_path):
    """Blocks of [8, 48, 48] (8 blocks; windows [16, 32, 32] reach up to 2 blocks per axis):
    every window of the global grid is forwarded exactly once, and the affinities equal the
    float32 blend of all windows over the whole volume (the former scheme, and the fine-tuning
    validation's path, inference.predict_block) to float rounding: float16 output identical
    to within one float16 step, uint8 identical but for values that sit on a rounding edge."""
    from distributed import Client, LocalCluster

    raw = zarr.open_group(str(infer_setup / "v.zarr"))["raw"]
    cfg = dataclasses.replace(CFG, block=(8, 48, 48))
    grid = np.prod([len(window_starts(n, w, w - o)) for n, w, o in
                    zip(raw.shape, cfg.window, cfg.overlap, strict=True)])
    inference._MODELS.clear()
    stored = {}
    with Client(LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                             dashboard_address=None)) as client:
        for dtype in ("float16", "uint8"):
            before = inference.FORWARDS["windows"]
            out = inference.run(infer_setup / "v.zarr", infer_setup / "model.pt",
                                tmp_path / f"{dtype}.zarr", dataclasses.replace(cfg, dtype=dtype),
                                client=client)
            assert inference.FORWARDS["windows"] - before == grid  # redundancy 1.0
            stored[dtype] = zarr.open_group(str(out))["affinities"][:]
            assert not (out / inference.SUMS).exists()  # the pass-1 sums are gone
    torch.set_num_threads(cfg.threads)
    whole = tuple(slice(0, n) for n in raw.shape)
    ref = inference.predict_block(raw, infer_setup / "model.pt", whole, cfg)
    f16 = stored["float16"].astype(np.float32)
    assert np.abs(f16 - ref).max() <= np.abs(ref.astype(np.float16).astype(np.float32)
                                             - ref).max() * 2 + 1e-7
    u8 = inference._encode(ref, "uint8").astype(int)
    diff = np.abs(stored["uint8"].astype(int) - u8)
    # a differing uint8 value is one whose x 255 sits within float32 rounding of a .5 edge
    edge = np.abs((ref.astype(np.float64) * 255) % 1 - 0.5)
    assert diff.max() <= 1 and (not diff.any() or edge[diff > 0].max() < 1e-4), \
        f"{int((diff > 0).sum())} voxels differ, up to {edge[diff > 0].max():.2e} from an edge"


def test_pass_one_sums_are_exact_integer_sums(infer_setup):
    """The pass-1 sums of a block are the exact int64 sums of the per-window integer terms
    (rint(p x weight x scale)), summed here in the opposite order. At the run's scale the sums
    reach about 2^60, far past float64's 2^53, so an add done in float64 would round them and
    make them depend on the order of the windows and so on the blocking."""
    raw = zarr.open_group(str(infer_setup / "v.zarr"))["raw"]
    cfg = CFG
    model = inference.load_model(infer_setup / "model.pt")
    torch.set_num_threads(cfg.threads)
    scale = inference.sum_scale(raw.shape, cfg)
    core = tuple(slice(0, n) for n in raw.shape)
    acc, region = inference.owned_sums(raw, model, core, cfg, scale)
    assert region == core and acc.dtype == np.int64 and acc.max() > 2**56
    weight = gaussian_weight(cfg.window, cfg.sigma_scale).astype(np.float64) * scale
    wins = list(itertools.product(*inference._grid(raw.shape, cfg)))
    ref = np.zeros_like(acc)
    for st, p in reversed(list(inference._forward(raw, model, wins, cfg))):
        box = (slice(None),) + tuple(slice(a, a + w) for a, w in zip(st, cfg.window, strict=True))
        ref[box][:-1] += np.rint(p.astype(np.float64) * weight).astype(np.int64)
        ref[box][-1] += np.rint(weight).astype(np.int64)
    assert np.array_equal(acc, ref)


def test_affinities_do_not_depend_on_parallelism(infer_setup, tmp_path):
    """1 Dask worker with 1 thread vs 2 worker processes with 2 threads each (the CLI flags the
    rules derive from snakemake --cores): the same stored affinities, since every block task
    computes with infer.threads torch threads."""
    spec = json.dumps({"infer": {"block": [8, 48, 48], "window": [16, 32, 32],
                                 "overlap": [8, 16, 16], "dtype": "float16"}})
    stored = []
    for name, flags in (("a", ["--workers", "1", "--worker-threads", "1"]),
                        ("b", ["--workers", "2", "--worker-threads", "2"])):
        out = tmp_path / f"{name}.zarr"
        proc = subprocess.run([sys.executable, "-m", "tokenunify.cli", "infer",
                               str(infer_setup / "v.zarr"), "--checkpoint",
                               str(infer_setup / "model.pt"), "--out", str(out), "--spec", spec,
                               *flags], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stored.append(zarr.open_group(str(out))["affinities"][:])
    assert np.array_equal(stored[0], stored[1])


def test_small_volume_anisotropic_tta_and_uint8(infer_setup, tmp_path, rng):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    create_volume(g, "raw", (5, 20, 28), (5, 20, 28), np.uint8, (50, 4, 4), (0, 0, 0))[:] = \
        rng.integers(0, 255, (5, 20, 28), dtype=np.uint8)
    from distributed import Client, LocalCluster

    with Client(LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                             dashboard_address=None)) as client:
        out = inference.run(tmp_path / "s.zarr", infer_setup / "model.pt", tmp_path / "o.zarr",
                            dataclasses.replace(CFG, tta=True), client=client)
    a = zarr.open_group(str(out))["affinities"]
    assert a.dtype == np.uint8 and a.shape == (3, 5, 20, 28) and a.attrs["scale"] == 255.0
    assert a.attrs["voxel_size"] == [50.0, 4.0, 4.0]


def test_killed_run_resumes_only_missing_blocks_with_identical_output(infer_setup, tmp_path):
    """Kill the process (and its worker) mid-run; the rerun forwards only the windows of the
    blocks whose pass 1 had not finished and ends with the same result."""
    script = (
        "import logging, sys\n"
        "from tokenunify import inference\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "cfg = inference.InferConfig(block=(8, 48, 48), window=(16, 32, 32), overlap=(8, 16, 16),"
        " workers=1, threads_per_worker=1)\n"
        "if __name__ == '__main__':\n"
        "    inference.run(sys.argv[1], sys.argv[2], sys.argv[3], cfg)\n")
    out = tmp_path / "k.zarr"
    args = [sys.executable, "-c", script, str(infer_setup / "v.zarr"),
            str(infer_setup / "model.pt"), str(out)]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = tmp_path / "k.zarr.partial" / ".done" / "owned"
    deadline = time.time() + 300
    while time.time() < deadline and (not done.exists() or len(list(done.iterdir())) < 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: client, nanny, worker
    proc.wait()
    n_done = len(list(done.iterdir()))
    assert 2 <= n_done < 8 and not out.exists()
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{8 - n_done} of 8 blocks to predict" in rerun.stderr
    assert rerun.stderr.count(": windows in ") == 8 - n_done  # one pass-1 task per missing block
    from distributed import Client, LocalCluster

    with Client(LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                             dashboard_address=None)) as client:
        ref = inference.run(infer_setup / "v.zarr", infer_setup / "model.pt", tmp_path / "ref.zarr",
                            InferConfig(block=(8, 48, 48), window=(16, 32, 32),
                                        overlap=(8, 16, 16)),
                            client=client)  # torch threads: infer.threads, as in the killed run
    np.testing.assert_array_equal(zarr.open_group(str(out))["affinities"][:],
                                  zarr.open_group(str(ref))["affinities"][:])


def test_a_pretraining_checkpoint_is_refused_by_name(infer_setup, tmp_path):
    """A checkpoint with fewer output channels than the 3 affinities (pretraining's single
    reconstruction channel) stops inference before anything is written, naming the file."""
    from tokenunify.model import checkpoint as ckpt
    from tokenunify.model.emmamba import EMmamba, preset

    net = EMmamba(preset("tiny", out_channels=1))
    bad = tmp_path / "pretrained.pt"
    ckpt.save({"model": net.state_dict(), "model_config": net.config.to_dict(), "step": 0}, bad)
    with pytest.raises(ValueError, match=r"pretrained\.pt: the model has 1 output channels"):
        inference.run(infer_setup / "v.zarr", bad, tmp_path / "o.zarr", CFG)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.partial").exists()
