"""Sources on S3, against moto's S3 server on 127.0.0.1 (the server s3fs and zarr test against):
an HDF5 file and a zarr store read as on disk; a missing bucket, missing credentials and an
unreachable endpoint each get an error naming the URL, and no credential in any message."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr

from tests.conftest import free_port
from tokenunify.io.sources import SourceError, SourceSpec, open_source

moto_server = pytest.importorskip("moto.server", reason="moto (dev extra) not installed")
BUCKET = "tokenunify-sources"
SECRET = "not-a-real-secret-1234"


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """Credentials and endpoint from the standard environment; a fresh cache."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("TOKENUNIFY_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return client


def test_h5_and_zarr_sources_on_s3(s3, tmp_path, rng):
    vol = rng.integers(0, 255, (6, 20, 24), dtype=np.uint8)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["main"] = vol
    s3.upload_file(str(tmp_path / "x.h5"), BUCKET, "em/x.h5")
    g = zarr.open_group(str(tmp_path / "v.zarr"), mode="w")
    g.create_array("raw", shape=vol.shape, chunks=(3, 10, 12), dtype=vol.dtype)[:] = vol
    for p in (tmp_path / "v.zarr").rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), BUCKET, f"em/v.zarr/{p.relative_to(tmp_path / 'v.zarr')}")
    for spec in (SourceSpec(f"s3://{BUCKET}/em/x.h5", key="main"),
                 SourceSpec(f"s3://{BUCKET}/em/v.zarr", key="raw")):
        v = open_source(spec)
        np.testing.assert_array_equal(v.read(v.full_box()), vol)
    assert open_source(SourceSpec(f"s3://{BUCKET}/em/x.h5", key="main"), fetch=False) is not None


def test_missing_bucket_and_object_are_named(s3):
    with pytest.raises(SourceError, match="s3://no-such-bucket/x.h5: the bucket does not exist"):
        open_source(SourceSpec("s3://no-such-bucket/x.h5", key="main"), "datasets.d.raw")
    with pytest.raises(SourceError, match=f"s3://{BUCKET}/absent.h5: no such object"):
        open_source(SourceSpec(f"s3://{BUCKET}/absent.h5", key="main"))


def test_missing_credentials_are_named(s3, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError, match=f"s3://{BUCKET}/x.h5: no credentials found") as err:
        open_source(SourceSpec(f"s3://{BUCKET}/x.h5", key="main"))
    assert SECRET not in str(err.value)


def test_unreachable_endpoint_is_named(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceError, match=rf"s3://{BUCKET}/y.h5: cannot reach http://127.0.0.1:"
                       ) as err:
        open_source(SourceSpec(f"s3://{BUCKET}/y.h5", key="main"))
    assert SECRET not in str(err.value)
