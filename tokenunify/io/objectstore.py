"""Reading sources from object stores: ``s3://bucket/key`` (boto3) and ``gs://bucket/key``
(google-cloud-storage).

A file (``.h5``, ``.tif``, ...) is fetched into the cache like an http(s) file
(:func:`tokenunify.io.remote.fetch`); a ``.zarr`` store, which is a folder of objects, is
fetched object by object into one cache folder. Both are written under a temporary name and
renamed when complete. Precomputed volumes on a bucket are not fetched here: cloud-volume
reads them chunk by chunk (:class:`tokenunify.io.sources.PrecomputedVolume`).

Credentials come from each library's standard chain, never from the config or the URL:
for S3 ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``),
``AWS_PROFILE`` and ``~/.aws/credentials``, or an instance role; ``AWS_ENDPOINT_URL`` points at
another S3 service (MinIO, Ceph, a local test server); for GCS, Application Default
Credentials (``GOOGLE_APPLICATION_CREDENTIALS``), and ``STORAGE_EMULATOR_HOST`` points at a GCS
emulator (anonymous, as the client library does). Nothing here logs or stores a credential:
messages name the URL only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

SCHEMES = ("s3://", "gs://")
GCS_RETRY_DEADLINE_S = 120.0  # how long a GCS call keeps retrying (an unreachable store, 5xx)


def _gcs():
    """(client, retry): a GCS client with Application Default Credentials, or anonymous
    against ``STORAGE_EMULATOR_HOST`` (a local emulator), and the retry policy of every call."""
    from google.cloud import storage
    from google.cloud.storage.retry import DEFAULT_RETRY

    return storage.Client(), DEFAULT_RETRY.with_deadline(GCS_RETRY_DEADLINE_S)


def is_object_url(url: str) -> bool:
    return url.startswith(SCHEMES)


def split(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of ``s3://bucket/key`` or ``gs://bucket/key``."""
    u = urlparse(url)
    if u.scheme not in ("s3", "gs") or not u.netloc:
        raise ValueError(f"{url}: not an s3:// or gs:// URL with a bucket")
    return u.scheme, u.netloc, u.path.lstrip("/")


def _s3_client():
    """A client with the standard credential chain as the environment is now (a new session:
    boto3's default one keeps the first credentials it found); botocore honours
    AWS_ENDPOINT_URL."""
    import boto3

    return boto3.session.Session().client("s3")


def _s3_code(exc: Exception) -> str | None:
    """botocore's error code (its ``response`` is a dict); None for other libraries' errors
    (google's carry an HTTP response object)."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _explain(url: str, exc: Exception) -> OSError:
    """An OSError naming ``url`` and what went wrong, without any credential."""
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        how = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or "
               "~/.aws/credentials" if url.startswith("s3://") else
               "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default "
               "login`")
        return OSError(f"{url}: no credentials found for the object store ({how})")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError",
                "ReadTimeoutError", "TransportError", "RetryError"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint") \
            if url.startswith("s3://") else os.environ.get("STORAGE_EMULATOR_HOST",
                                                            "Google Cloud Storage")
        return OSError(f"{url}: cannot reach {endpoint} ({name})")
    code = _s3_code(exc)
    if code in ("NoSuchBucket",):
        return OSError(f"{url}: the bucket does not exist")
    if code in ("404", "NoSuchKey", "NotFound") or name == "NotFound":
        return OSError(f"{url}: {'no such object' if _bucket_exists(url) else 'the bucket does not exist'}")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or \
            name == "Forbidden":
        return OSError(f"{url}: access denied (check the credentials' rights on the bucket)")
    return OSError(f"{url}: {name}: {exc}")


def _bucket_exists(url: str) -> bool:
    """False only when the store says the bucket is not there (S3 answers a missing object
    and a missing bucket alike with 404 to a HEAD)."""
    scheme, bucket, _ = split(url)
    try:
        if scheme == "s3":
            _s3_client().head_bucket(Bucket=bucket)
        else:
            client, retry = _gcs()
            return client.bucket(bucket).exists(retry=retry)
    except Exception as exc:  # noqa: BLE001
        return _s3_code(exc) not in ("404", "NoSuchBucket")
    return True


def list_objects(url: str) -> list[str]:
    """Keys under the prefix ``url`` (a folder), relative to it."""
    scheme, bucket, prefix = split(url.rstrip("/") + "/")
    try:
        if scheme == "s3":
            pages = _s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix)
            keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
        else:
            client, retry = _gcs()
            keys = [b.name for b in client.list_blobs(bucket, prefix=prefix, retry=retry)]
    except Exception as exc:  # noqa: BLE001 - every library error becomes one named OSError
        raise _explain(url, exc) from exc
    return [k[len(prefix):] for k in keys if not k.endswith("/")]


def download(url: str, dest: Path, client=None) -> Path:
    """Copy the object ``url`` to ``dest`` (through a temporary file and a rename);
    ``client``: what :func:`client_for` gave for this store, to reuse."""
    scheme, bucket, key = split(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    os.close(fd)
    try:
        if scheme == "s3":
            (client or _s3_client()).download_file(bucket, key, tmp)
        else:
            gcs, retry = client or _gcs()
            gcs.bucket(bucket).blob(key).download_to_filename(tmp, retry=retry)
        os.replace(tmp, dest)
    except Exception as exc:  # noqa: BLE001
        raise _explain(url, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def client_for(url: str):
    """One client for many objects of ``url``'s store: an S3 client, or GCS's (client,
    retry)."""
    return _s3_client() if url.startswith("s3://") else _gcs()


def download_folder(url: str, dest: Path) -> Path:
    """Copy every object under the prefix ``url`` (a zarr store) into the folder ``dest``,
    through a temporary folder and a rename."""
    keys = list_objects(url)
    if not keys:
        raise OSError(f"{url}: no objects under this prefix")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name, suffix=".part"))
    try:
        log.info("fetching %d objects under %s", len(keys), url)
        client = client_for(url)
        for k in keys:
            download(url.rstrip("/") + "/" + k, tmp / k, client)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
