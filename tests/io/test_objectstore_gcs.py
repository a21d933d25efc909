"""Sources on Google Cloud Storage, against a GCS emulator on 127.0.0.1 (gcp-storage-emulator,
which the client library reaches through STORAGE_EMULATOR_HOST): an HDF5 file and a zarr store
read as on disk; a missing bucket and object, missing credentials and an unreachable store each
get an error naming the URL."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr

from tests.conftest import free_port
from tokenunify.io import objectstore
from tokenunify.io.sources import SourceError, SourceSpec, open_source

emulator = pytest.importorskip("gcp_storage_emulator.server",
                               reason="gcp-storage-emulator (dev extra) not installed")
BUCKET = "tokenunify-gs-sources"


@pytest.fixture(scope="module")
def gcs_host():
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs(gcs_host, monkeypatch, tmp_path):
    """The emulator from the standard environment variable; a fresh cache; the bucket."""
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    monkeypatch.setenv("TOKENUNIFY_CACHE", str(tmp_path / "cache"))
    client = storage.Client()
    bucket = client.bucket(BUCKET)
    if not bucket.exists():
        bucket = client.create_bucket(BUCKET)
    return bucket


def test_h5_and_zarr_sources_on_gcs(gcs, tmp_path, rng):
    vol = rng.integers(0, 255, (6, 20, 24), dtype=np.uint8)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["main"] = vol
    gcs.blob("em/x.h5").upload_from_filename(str(tmp_path / "x.h5"))
    g = zarr.open_group(str(tmp_path / "v.zarr"), mode="w")
    g.create_array("raw", shape=vol.shape, chunks=(3, 10, 12), dtype=vol.dtype)[:] = vol
    for p in (tmp_path / "v.zarr").rglob("*"):
        if p.is_file():
            gcs.blob(f"em/v.zarr/{p.relative_to(tmp_path / 'v.zarr')}").upload_from_filename(
                str(p))
    for spec in (SourceSpec(f"gs://{BUCKET}/em/x.h5", key="main"),
                 SourceSpec(f"gs://{BUCKET}/em/v.zarr", key="raw")):
        v = open_source(spec)
        np.testing.assert_array_equal(v.read(v.full_box()), vol)


def test_missing_bucket_and_object_are_named(gcs):
    with pytest.raises(SourceError, match="gs://no-such-bucket/x.h5: the bucket does not exist"):
        open_source(SourceSpec("gs://no-such-bucket/x.h5", key="main"), "datasets.d.raw")
    with pytest.raises(SourceError, match=f"gs://{BUCKET}/absent.h5: no such object"):
        open_source(SourceSpec(f"gs://{BUCKET}/absent.h5", key="main"))
    with pytest.raises(SourceError, match=f"gs://{BUCKET}/absent.zarr: no objects"):
        open_source(SourceSpec(f"gs://{BUCKET}/absent.zarr", key="raw"))


def test_missing_credentials_are_named(gcs, monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(SourceError, match=f"gs://{BUCKET}/x.h5: no credentials found"):
        open_source(SourceSpec(f"gs://{BUCKET}/x.h5", key="main"))


def test_unreachable_store_is_named(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(objectstore, "GCS_RETRY_DEADLINE_S", 1.0)
    with pytest.raises(SourceError, match=rf"gs://{BUCKET}/y.h5: cannot reach http://127.0.0.1:"):
        open_source(SourceSpec(f"gs://{BUCKET}/y.h5", key="main"))
