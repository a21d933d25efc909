"""Download stage: every reader into results/data/*.zarr, attributes, resume, real data."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr
from conftest import NEUROPROOF, need

from tokenunify import download
from tokenunify.config import DownloadConfig, load_config
from tokenunify.io import sources
from tokenunify.io.datasets import DatasetSpec
from tokenunify.io.sources import SourceSpec


def spec_for(path, key="raw", labels=None, **kw):
    return DatasetSpec(name="d", raw=SourceSpec(str(path), key=key), labels=labels,
                       voxel_size=kw.pop("voxel_size", (40.0, 8.0, 8.0)), **kw)


def test_synthetic_download_layout_and_attrs(tmp_path):
    url = "synthetic://em?shape=8,64,80&seed=5"
    spec = DatasetSpec(name="syn", raw=SourceSpec(url, key="raw"),
                       labels=SourceSpec(url, key="labels"), roles=("train",))
    out = download.run(spec, tmp_path / "syn.zarr", DownloadConfig(block=(4, 32, 64)))
    g = zarr.open_group(str(out), mode="r")
    raw, lab = g["raw"], g["labels"]
    assert raw.dtype == np.uint8 and lab.dtype == np.uint64
    assert raw.chunks == (4, 32, 64)
    for a in (raw, lab):
        assert a.attrs["voxel_size"] == [40.0, 8.0, 8.0]
        assert a.attrs["offset"] == [0.0, 0.0, 0.0]
        assert a.attrs["axis_names"] == ["z", "y", "x"]
        assert a.attrs["provenance"]["stage"] == "download"
    assert g.attrs["roles"] == ["train"]
    from tokenunify.data.synthetic import generate
    ref = generate((8, 64, 80), seed=5)
    np.testing.assert_array_equal(raw[:], ref["raw"])
    np.testing.assert_array_equal(lab[:], ref["labels"])
    assert not (tmp_path / "syn.zarr.partial").exists()


def test_non_uint8_raw_is_rescaled_by_a_streaming_pass(tmp_path, rng):
    vol = rng.integers(1000, 3000, (6, 20, 20)).astype(np.uint16)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = vol
    out = download.run(spec_for(tmp_path / "a.h5"), tmp_path / "o.zarr",
                       DownloadConfig(block=(2, 8, 8)))
    raw = zarr.open_group(str(out))["raw"][:]
    expect = np.rint((vol - vol.min()) * 255.0 / (vol.max() - vol.min())).astype(np.uint8)
    np.testing.assert_array_equal(raw, expect)


@pytest.mark.parametrize("intensity_range", [None, (0.0, 1.0)],
                         ids=["streaming-range", "given-range"])
def test_float_raw_with_nan_stops_with_the_count(tmp_path, rng, intensity_range):
    """NaN used to become 0 with only a numpy warning; now the download stops and names the
    dataset, the source, the block and how many NaN voxels it holds."""
    vol = rng.random((4, 16, 16)).astype(np.float32)
    vol[3, 10, 2:5] = np.nan  # 3 NaN voxels in block z 2:4, y 8:16, x 0:8
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["raw"] = vol
    spec = DatasetSpec(name="d", raw=SourceSpec(str(tmp_path / "f.h5"), key="raw",
                                                intensity_range=intensity_range),
                       voxel_size=(40.0, 8.0, 8.0))
    with pytest.raises(sources.SourceError,
                       match=r"datasets.d.raw \(.*f.h5\), block z 2:4, y 8:16, x 0:8: 3 NaN "
                             r"voxels"):
        download.run(spec, tmp_path / "o.zarr", DownloadConfig(block=(2, 8, 8), workers=1))
    assert not (tmp_path / "o.zarr").exists()


def test_bbox_sets_offset(tmp_path, rng):
    vol = rng.integers(0, 255, (10, 30, 30), dtype=np.uint8)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = vol
    spec = spec_for(tmp_path / "a.h5", bbox=((2, 5, 6), (8, 25, 30)), offset=(100.0, 0.0, 8.0))
    out = download.run(spec, tmp_path / "o.zarr", DownloadConfig(block=(4, 16, 16)))
    raw = zarr.open_group(str(out))["raw"]
    np.testing.assert_array_equal(raw[:], vol[2:8, 5:25, 6:30])
    assert raw.attrs["offset"] == [180.0, 40.0, 56.0]


def test_resume_after_crash_skips_written_blocks(tmp_path, rng, monkeypatch):
    vol = rng.integers(0, 255, (8, 32, 32), dtype=np.uint8)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = vol
    spec, cfg = spec_for(tmp_path / "a.h5"), DownloadConfig(block=(2, 16, 16), workers=1)
    out = tmp_path / "o.zarr"
    real_read = sources.H5Volume.read
    reads = []

    def crashing(self, box):
        reads.append(box)
        if len(reads) == 7:
            raise OSError("simulated crash")
        return real_read(self, box)

    monkeypatch.setattr(sources.H5Volume, "read", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        download.run(spec, out, cfg)
    assert not out.exists() and (tmp_path / "o.zarr.partial").exists()
    done_before = len(list((tmp_path / "o.zarr.partial" / ".done" / "block").iterdir()))
    assert 6 <= done_before < 16  # in-flight blocks may finish; queued ones are cancelled
    reads.clear()
    monkeypatch.setattr(sources.H5Volume, "read", lambda self, box: (reads.append(box),
                                                                      real_read(self, box))[1])
    download.run(spec, out, cfg)
    assert len(reads) == 16 - done_before  # only the missing blocks were read again
    np.testing.assert_array_equal(zarr.open_group(str(out))["raw"][:], vol)


def test_failed_rerun_keeps_the_previous_output(tmp_path, rng, monkeypatch):
    vol = rng.integers(0, 255, (4, 16, 16), dtype=np.uint8)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = vol
    out = tmp_path / "o.zarr"
    download.run(spec_for(tmp_path / "a.h5"), out, DownloadConfig(block=(2, 16, 16)))
    monkeypatch.setattr(sources.H5Volume, "read", lambda self, box: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        download.run(spec_for(tmp_path / "a.h5"), out, DownloadConfig(block=(2, 8, 8)))
    np.testing.assert_array_equal(zarr.open_group(str(out))["raw"][:], vol)


def test_neuroproof_png_slices_with_mapped_gzip_hdf5_labels(tmp_path):
    """The real NeuroProof FIB-SEM volume: 250 PNGs + gzip HDF5 supervoxels -> bodies."""
    need(NEUROPROOF)
    cfg_file = tmp_path / "np.yaml"
    cfg_file.write_text(f"""
datasets:
  neuroproof:
    raw: {{source: "{NEUROPROOF / 'grayscale_maps'}"}}
    labels:
      source: "{NEUROPROOF / 'groundtruth.h5.gz'}"
      key: stack
      mapping: {{key: transforms}}
    voxel_size: [10, 10, 10]
    roles: [pretrain, train, test]
""")
    cfg = load_config(cfg_file)
    out = download.run(cfg.datasets["neuroproof"], tmp_path / "np.zarr",
                       DownloadConfig(block=(64, 128, 128)))
    g = zarr.open_group(str(out), mode="r")
    raw, lab = g["raw"][:], g["labels"][:]
    assert raw.shape == lab.shape == (250, 250, 250)
    bodies = np.unique(lab)
    assert len(bodies) == 526  # SOURCE.md: 526 body ids including 0
    # Labels line up with the raw data: membranes (body boundaries) are dark.
    b = np.zeros(lab.shape, bool)
    for ax in range(3):
        d = np.diff(lab, axis=ax) != 0
        sl = [slice(None)] * 3
        sl[ax] = slice(1, None)
        b[tuple(sl)] |= d
    inside, edge = raw[~b].mean(), raw[b].mean()
    assert edge < inside - 20, (edge, inside)
    flipped = np.flip(lab, axis=1)
    bf = np.zeros(lab.shape, bool)
    bf[:, 1:, :] |= np.diff(flipped, axis=1) != 0
    assert raw[bf].mean() > edge + 15  # a y-flip would not line up


def test_precomputed_over_local_http_with_segmentation_labels(tmp_path, rng):
    """cloud-volume image + segmentation layers served by http.server on 127.0.0.1."""
    import functools
    import http.server
    import threading

    from cloudvolume import CloudVolume

    raw = rng.integers(0, 255, (6, 40, 48), dtype=np.uint8)
    lab = rng.integers(1, 2**40, (6, 40, 48), dtype=np.uint64)
    www = tmp_path / "www"
    for name, vol, layer in (("img", raw, "image"), ("seg", lab, "segmentation")):
        info = CloudVolume.create_new_info(
            num_channels=1, layer_type=layer, data_type=str(vol.dtype), encoding="raw",
            resolution=[8, 8, 40], voxel_offset=[0, 0, 0], volume_size=[48, 40, 6],
            chunk_size=[16, 16, 2])
        cv = CloudVolume(f"file://{www / name}", info=info, compress=False, progress=False)
        cv.commit_info()
        cv[:, :, :] = vol.transpose(2, 1, 0)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        spec = DatasetSpec(name="cv", raw=SourceSpec(f"precomputed://{base}/img"),
                           labels=SourceSpec(f"precomputed://{base}/seg"), roles=("test",))
        out = download.run(spec, tmp_path / "cv.zarr", DownloadConfig(block=(4, 32, 32)))
    finally:
        server.shutdown()
        server.server_close()
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["raw"][:], raw)
    np.testing.assert_array_equal(g["labels"][:], lab)
    assert g["raw"].attrs["voxel_size"] == [40.0, 8.0, 8.0]
