"""Every source reader, each against data the test writes itself, plus the missing-data rules."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr

from tokenunify.io import remote
from tokenunify.io.sources import (
    MappingSpec,
    MissingDataError,
    SourceError,
    SourceSpec,
    open_source,
    read_mapping,
)

FULL = (slice(0, 6), slice(0, 20), slice(0, 24))


@pytest.fixture
def vol(rng):
    return rng.integers(0, 255, (6, 20, 24), dtype=np.uint8)


@pytest.fixture
def http_root(tmp_path):
    """A plain `http.server` on 127.0.0.1 serving tmp_path/www; yields (root, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def read_all(spec):
    v = open_source(spec)
    return v, v.read(v.full_box())


def test_hdf5_with_key_and_gzip(tmp_path, vol):
    p = tmp_path / "a.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("volumes/raw", data=vol, chunks=(2, 10, 12))
        f["volumes/raw"].attrs["resolution"] = [40, 4, 4]
        f.create_dataset("other", data=vol)
    v, got = read_all(SourceSpec(str(p), key="volumes/raw"))
    np.testing.assert_array_equal(got, vol)
    assert v.voxel_size == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(v.read((slice(2, 5), slice(3, 9), slice(0, 4))),
                                  vol[2:5, 3:9, 0:4])
    gz = tmp_path / "a.h5.gz"
    with open(p, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    np.testing.assert_array_equal(read_all(SourceSpec(str(gz), key="other"))[1], vol)
    with pytest.raises(SourceError, match=r"raw\.key|key: no dataset 'volumes/nope'"):
        open_source(SourceSpec(str(p), key="volumes/nope"), where="datasets.x.raw")
    with pytest.raises(SourceError, match="say which one"):
        open_source(SourceSpec(str(p)))


def test_tiff_stack(tmp_path, vol):
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, vol)
    v, got = read_all(SourceSpec(str(p)))
    assert v.shape == vol.shape
    np.testing.assert_array_equal(got, vol)
    np.testing.assert_array_equal(v.read((slice(4, 6), slice(1, 3), slice(5, 9))),
                                  vol[4:6, 1:3, 5:9])


def test_png_folder_natural_order_and_gaps(tmp_path, vol):
    d = tmp_path / "slices"
    d.mkdir()
    for i, sl in enumerate(vol):  # s8 ... s13: lexicographic order would put s10 before s8
        iio.imwrite(d / f"s{i + 8}.png", sl)
    v, got = read_all(SourceSpec(str(d)))
    assert v.shape == vol.shape
    np.testing.assert_array_equal(got, vol)
    (d / "s11.png").unlink()
    with pytest.raises(MissingDataError, match=r"missing numbers \[11\]"):
        open_source(SourceSpec(str(d)))
    v, got = read_all(SourceSpec(str(d), allow_missing=True))
    assert v.shape == vol.shape and (got[3] == 0).all()
    np.testing.assert_array_equal(got[4], vol[4])
    (d / "s11.png").write_bytes(b"not a png")  # present but unreadable
    with pytest.raises(MissingDataError, match="s11.png"):
        open_source(SourceSpec(str(d))).read(FULL)
    assert (open_source(SourceSpec(str(d), allow_missing=True)).read(FULL)[3] == 0).all()


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_v2_v3_and_missing_chunks(tmp_path, vol, fmt):
    p = tmp_path / f"v{fmt}.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=fmt)
    a = g.create_array("raw", shape=vol.shape, chunks=(3, 10, 12), dtype=vol.dtype)
    a[:] = vol
    a.attrs["voxel_size"] = [30, 6, 6]
    v, got = read_all(SourceSpec(str(p), key="raw"))
    np.testing.assert_array_equal(got, vol)
    assert v.voxel_size == (30.0, 6.0, 6.0)
    with pytest.raises(SourceError, match="say which array"):
        open_source(SourceSpec(str(p)))
    # Delete one chunk: reading it must not return silent zeros.
    key = a.metadata.encode_chunk_key((1, 0, 1))
    (p / "raw" / key).unlink()
    with pytest.raises(MissingDataError, match="missing"):
        open_source(SourceSpec(str(p), key="raw")).read(FULL)
    part = open_source(SourceSpec(str(p), key="raw")).read((slice(0, 3), slice(0, 20),
                                                             slice(0, 24)))
    np.testing.assert_array_equal(part, vol[:3])
    filled = open_source(SourceSpec(str(p), key="raw", allow_missing=True)).read(FULL)
    assert (filled[3:6, 0:10, 12:24] == 0).all()


def _write_precomputed(path, vol, layer="image"):
    from cloudvolume import CloudVolume

    seg = layer == "segmentation"
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type=layer, data_type=str(vol.dtype),
        encoding="raw", resolution=[8, 8, 40], voxel_offset=[3, 2, 1],
        volume_size=vol.shape[::-1], chunk_size=[12, 10, 3] if not seg else [12, 10, 3])
    cv = CloudVolume(f"file://{path}", info=info, compress=False, progress=False)
    cv.commit_info()
    cv[3:3 + vol.shape[2], 2:2 + vol.shape[1], 1:1 + vol.shape[0]] = vol.transpose(2, 1, 0)
    return cv


def test_precomputed_file_and_http(tmp_path, vol, http_root):
    root, base = http_root
    _write_precomputed(root / "img", vol)
    for url in (f"precomputed://file://{root / 'img'}", f"precomputed://{base}/img",
                f"{base}/img"):
        v, got = read_all(SourceSpec(url))
        np.testing.assert_array_equal(got, vol)
        assert v.voxel_size == (40.0, 8.0, 8.0) and v.offset == (40.0, 16.0, 24.0)
    # Remove a chunk file: over HTTP this must be an error naming the chunk, not zeros.
    chunk = next((root / "img" / "8_8_40").iterdir())
    chunk.unlink()
    with pytest.raises(MissingDataError, match="missing chunk"):
        open_source(SourceSpec(f"precomputed://{base}/img")).read(FULL)
    got = open_source(SourceSpec(f"precomputed://{base}/img", allow_missing=True)).read(FULL)
    assert (got == 0).sum() >= 3 * 10 * 12


def test_remote_h5_over_http_and_hf(tmp_path, vol, http_root, monkeypatch):
    root, base = http_root
    with h5py.File(root / "x.h5", "w") as f:
        f["main"] = vol
    np.testing.assert_array_equal(read_all(SourceSpec(f"{base}/x.h5", key="main"))[1], vol)
    # hf:// through the plain /resolve/ endpoint (huggingface_hub not installed here).
    hf_file = root / "datasets" / "org" / "em" / "resolve" / "v1" / "sub" / "y.h5"
    hf_file.parent.mkdir(parents=True)
    shutil.copy(root / "x.h5", hf_file)
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    url = "hf://datasets/org/em@v1/sub/y.h5"
    assert remote.hf_resolve_url(url) == f"{base}/datasets/org/em/resolve/v1/sub/y.h5"
    np.testing.assert_array_equal(read_all(SourceSpec(url, key="main"))[1], vol)
    with pytest.raises(SourceError, match="HTTP 404"):
        open_source(SourceSpec("hf://datasets/org/em/absent.h5", key="main"))


def test_remote_slice_stack_checksums_and_mirror(tmp_path, vol, http_root, monkeypatch):
    """A URL with {first..last} is a stack of slices fetched in order (zero padding kept); its
    sha256 is that of the slices' bytes in order. A wrong sha256 is an error naming the URL
    and both digests, and nothing enters the cache; TOKENUNIFY_MIRROR reads a local copy."""
    import imageio.v3 as iio

    root, base = http_root
    for z in range(vol.shape[0]):
        iio.imwrite(root / f"s{8 + z:02d}.png", vol[z])
    url = f"{base}/s{{08..13}}.png"
    assert remote.expand_range(url)[:2] == [f"{base}/s08.png", f"{base}/s09.png"]
    digest = remote.sha256_of([root / f"s{8 + z:02d}.png" for z in range(vol.shape[0])])
    bad = "0" * 64
    with pytest.raises(SourceError, match=rf"s\{{08..13\}}.png: SHA-256 {digest} does not match "
                                          rf"the source's sha256 {bad}"):
        open_source(SourceSpec(url, sha256=bad))
    assert remote.cached_path(url) is None and not list(remote.cache_dir().glob("*.part"))
    np.testing.assert_array_equal(read_all(SourceSpec(url, sha256=digest))[1], vol)
    # one remote file: checked the same way
    with h5py.File(root / "x.h5", "w") as f:
        f["main"] = vol
    with pytest.raises(SourceError, match="does not match the source's sha256"):
        open_source(SourceSpec(f"{base}/x.h5", key="main", sha256=bad))
    assert remote.cached_path(f"{base}/x.h5") is None
    # a mirror: the same URLs read from a local folder, without the server
    local = tmp_path / "copy"
    shutil.copytree(root, local)
    monkeypatch.setenv("TOKENUNIFY_MIRROR", f"https://example.org/data={local}")
    monkeypatch.setenv("TOKENUNIFY_CACHE", str(tmp_path / "cache2"))
    mirrored = "https://example.org/data/s{08..13}.png"
    np.testing.assert_array_equal(read_all(SourceSpec(mirrored, sha256=digest))[1], vol)
    sha = remote.sha256_of([root / "x.h5"])
    assert remote.fetch("https://example.org/data/x.h5", sha256=sha) == local / "x.h5"
    with pytest.raises(OSError, match="TOKENUNIFY_MIRROR copy .* does not exist"):
        remote.fetch("https://example.org/data/absent.h5")


def test_mapping_table(tmp_path):
    p = tmp_path / "gt.h5"
    with h5py.File(p, "w") as f:
        f["stack"] = np.arange(8, dtype=np.int32).reshape(2, 2, 2)
        f["transforms"] = np.array([[1, 10], [2, 10], [3, 30]], np.int64)
        f["bad"] = np.ones((3, 3))
    spec = SourceSpec(str(p), key="stack", mapping=MappingSpec(key="transforms"))
    np.testing.assert_array_equal(read_mapping(spec, "x")[:, 1], [10, 10, 30])
    with pytest.raises(SourceError, match=r"expected \(N, 2\)"):
        read_mapping(SourceSpec(str(p), key="stack", mapping=MappingSpec(key="bad")), "x")


def test_unknown_scheme_and_missing_file(tmp_path):
    with pytest.raises(SourceError, match="unsupported URL scheme"):
        open_source(SourceSpec("ftp://host/x.h5"))
    with pytest.raises(SourceError, match="file not found"):
        open_source(SourceSpec(str(tmp_path / "nope.h5")), where="datasets.d.raw")
